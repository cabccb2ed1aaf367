"""Server-side sessions, login rate limits and the app's own key, in PostgreSQL (shared by every replica).

- `imagemill_review_sessions`: one row per login, keyed by the SHA-256 of its cookie (the database
  never holds a usable cookie). Logout deletes it; it ends after `session_hours`, after
  `session_idle_minutes` unused, or when its reviewer's token changes (the row keeps a fingerprint).
- `imagemill_review_login_failures`: one row per failed login, by key (`address:…`, `reviewer:…`);
  a key with too many in the window is refused with the time until the oldest one leaves it.
- The key in `imagemill_review_meta` (`key`): random, made once, for signing the login form's nonce
  and proxy mode's CSRF tokens when `IMAGEMILL_REVIEW_SESSION_SECRET` is unset.
"""

import hashlib
import math
import secrets
from dataclasses import dataclass
from typing import Any

import psycopg

from imagemill.review.db import Pool
from imagemill.review.settings import Reviewer, Role

SESSIONS = "imagemill_review_sessions"
FAILURES = "imagemill_review_login_failures"
META = "imagemill_review_meta"


@dataclass(frozen=True)
class Session:
    reviewer: Reviewer
    csrf: str


def _digest(cookie: str) -> str:
    return hashlib.sha256(b"imagemill-review-session\x00" + cookie.encode()).hexdigest()


class Sessions:
    """Sessions in the database: made at login, looked up on every request, deleted at logout."""

    def __init__(self, pool: Pool, session_s: float, idle_s: float) -> None:
        self._pool = pool
        self.session_s = session_s
        self.idle_s = idle_s
        # last_seen is written at most this often per session: not a write per request
        self._touch_s = max(min(60.0, idle_s / 4), 0.5)

    def setup(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {SESSIONS} (id text PRIMARY KEY, reviewer text NOT NULL, role text NOT NULL,"
            " csrf text NOT NULL, fingerprint text NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),"
            " last_seen timestamptz NOT NULL DEFAULT now(), expires_at timestamptz NOT NULL)"
        )
        conn.execute(f"CREATE INDEX IF NOT EXISTS {SESSIONS}_reviewer_idx ON {SESSIONS} (reviewer)")
        conn.execute(f"CREATE INDEX IF NOT EXISTS {SESSIONS}_expires_idx ON {SESSIONS} (expires_at)")

    def create(self, reviewer: Reviewer, fingerprint: str) -> tuple[str, Session]:
        """A new session: the cookie value (only the browser keeps it) and the session."""
        cookie = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        with self._pool.connection() as conn, conn.transaction():
            conn.execute(f"DELETE FROM {SESSIONS} WHERE expires_at <= now()")
            conn.execute(
                f"INSERT INTO {SESSIONS} (id, reviewer, role, csrf, fingerprint, expires_at)"
                " VALUES (%s, %s, %s, %s, %s, now() + make_interval(secs => %s))",
                (_digest(cookie), reviewer.name, str(reviewer.role), csrf, fingerprint, self.session_s),
            )
        return cookie, Session(reviewer, csrf)

    def get(self, cookie: str | None) -> tuple[Session, str] | None:
        """The live session of a cookie and its token fingerprint; None when there is none (never
        made, logged out, expired, or idle too long)."""
        if not cookie or len(cookie) > 256:
            return None
        with self._pool.connection() as conn:
            row = conn.execute(
                f"SELECT reviewer, role, csrf, fingerprint, extract(epoch FROM now() - last_seen) FROM {SESSIONS}"
                " WHERE id = %s AND expires_at > now() AND last_seen > now() - make_interval(secs => %s)",
                (_digest(cookie), self.idle_s),
            ).fetchone()
            if row is None:
                return None
            name, role, csrf, fingerprint, unseen = row
            if float(unseen) >= self._touch_s:
                conn.execute(f"UPDATE {SESSIONS} SET last_seen = now() WHERE id = %s", (_digest(cookie),))
        return Session(Reviewer(name, Role(role)), csrf), fingerprint

    def purge(self) -> int:
        """Delete the sessions that have ended: how many."""
        with self._pool.connection() as conn:
            return conn.execute(
                f"DELETE FROM {SESSIONS} WHERE expires_at <= now() OR last_seen <= now() - make_interval(secs => %s)",
                (self.idle_s,),
            ).rowcount

    def revoke(self, cookie: str | None) -> None:
        if cookie:
            with self._pool.connection() as conn:
                conn.execute(f"DELETE FROM {SESSIONS} WHERE id = %s", (_digest(cookie),))

    def revoke_changed(self, fingerprints: dict[str, str]) -> int:
        """End the sessions of reviewers whose token changed or who are gone: how many."""
        with self._pool.connection() as conn:
            return conn.execute(
                f"DELETE FROM {SESSIONS} AS s WHERE NOT EXISTS"
                " (SELECT 1 FROM unnest(%s::text[], %s::text[]) AS k(reviewer, fingerprint)"
                " WHERE k.reviewer = s.reviewer AND k.fingerprint = s.fingerprint)",
                (list(fingerprints), list(fingerprints.values())),
            ).rowcount


class LoginLimits:
    """Failed logins counted per key in a sliding window, in the database (so every replica sees
    every failure); a key at its limit is refused until its oldest failure leaves the window."""

    def __init__(self, pool: Pool, window_s: int, per_address: int, per_reviewer: int) -> None:
        self._pool = pool
        self.window_s = window_s
        self._limits = {"address": per_address, "reviewer": per_reviewer}

    def setup(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {FAILURES} (key text NOT NULL, failed_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute(f"CREATE INDEX IF NOT EXISTS {FAILURES}_key_idx ON {FAILURES} (key, failed_at)")

    def retry_after(self, keys: dict[str, str]) -> int | None:
        """Seconds until every key ({"address": ip, "reviewer": name}) may try again; None when
        none is at its limit."""
        names = {f"{kind}:{value}": self._limits[kind] for kind, value in keys.items() if value}
        with self._pool.connection() as conn:
            rows = conn.execute(
                f"SELECT key, count(*), extract(epoch FROM min(failed_at) + make_interval(secs => %s) - now())"
                f" FROM {FAILURES} WHERE key = ANY(%s) AND failed_at > now() - make_interval(secs => %s) GROUP BY key",
                (self.window_s, list(names), self.window_s),
            ).fetchall()
        waits = [float(wait) for key, count, wait in rows if count >= names[key]]
        return max(1, math.ceil(max(waits))) if waits else None

    def failed(self, keys: dict[str, str]) -> None:
        names = [f"{kind}:{value}" for kind, value in keys.items() if value]
        with self._pool.connection() as conn, conn.transaction():
            conn.execute(
                f"DELETE FROM {FAILURES} WHERE key = ANY(%s) AND failed_at <= now() - make_interval(secs => %s)",
                (names, self.window_s),
            )
            conn.execute(f"INSERT INTO {FAILURES} (key) SELECT unnest(%s::text[])", (names,))

    def purge(self) -> int:
        """Forget the failures that have left the window: how many."""
        with self._pool.connection() as conn:
            return conn.execute(
                f"DELETE FROM {FAILURES} WHERE failed_at <= now() - make_interval(secs => %s)", (self.window_s,)
            ).rowcount


def app_key(pool: Pool) -> bytes:
    """The app's random key, made by whichever replica asks first and the same for all after."""
    with pool.connection() as conn:
        conn.execute(
            f"INSERT INTO {META} (key, value) VALUES ('key', %s) ON CONFLICT (key) DO NOTHING",
            (secrets.token_hex(32),),
        )
        row = conn.execute(f"SELECT value FROM {META} WHERE key = 'key'").fetchone()
    assert row is not None
    return bytes.fromhex(row[0])
