"""The review queue in PostgreSQL: what is left to decide, who holds what, and the decisions.

Reads the records through the current-records view of the store (one row per uri, the object as it
is now); owns two tables of its own:

- `imagemill_review_claims` (uri, etag, reviewer, expires_at): an item handed to a reviewer is
  theirs until `expires_at`; the primary key and a conditional upsert make two claims on one item
  impossible, whatever the timing.
- `imagemill_reviews` (id, uri, etag, decision, reviewer, note, decided_at): append-only; the row
  with the highest id per (uri, etag) is the item's decision; an `undo` row takes it back to the queue.

The queue: current records without an error that are flagged, plus the unflagged ones whose uri
hashes under the audit rate (md5 in SQL, so the sample is stable and needs no column), that have no
decision and no live claim of another reviewer, in uri order (keyset pagination: `after`).
"""

import queue
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from imagemill.core.errors import UserError
from imagemill.core.redaction import redact_url, scrub_secret
from imagemill.core.stores.postgres import PostgresStore, current_view, split_table

CLAIMS = "imagemill_review_claims"
REVIEWS = "imagemill_reviews"
# "imgrevw" in ASCII; not the records store's lock, so the two never wait on each other
_SCHEMA_LOCK = 0x696D6772657677
AUDIT_SPACE = 2**32
# the audit sample's hash: the first 32 bits of md5(uri), an unsigned number below 2^32
AUDIT_HASH = "(('x' || substr(md5({uri}), 1, 8))::bit(32)::bigint)"
CLAIM_ROUNDS = 4
_FLAGGED, _AUDIT = "flagged", "audit"


class Decision(StrEnum):
    APPROVE = "approve"
    REJECT = "reject"
    ESCALATE = "escalate"


UNDO = "undo"
# what a decision is called on the object and in exports
OUTCOME = {Decision.APPROVE: "approved", Decision.REJECT: "rejected", Decision.ESCALATE: "escalated"}


class NotFound(Exception):
    """No current record has this (uri, etag), or there is nothing to undo."""


class HeldByAnother(Exception):
    """Another reviewer holds a live claim on the item."""

    def __init__(self, reviewer: str) -> None:
        super().__init__(f"claimed by another reviewer until the lease ends ({reviewer})")
        self.reviewer = reviewer


@dataclass(frozen=True)
class Filters:
    """What a reviewer narrowed the queue to; each None means any."""

    job_id: str | None = None
    label: str | None = None  # a moderation label: the score range applies to its score
    min_score: float | None = None  # without a label, to the record's top moderation score
    max_score: float | None = None


@dataclass(frozen=True)
class Item:
    uri: str
    etag: str
    job_id: str | None
    flagged: bool
    reason: str  # "flagged" or "audit"
    caption: str | None
    scores: dict[str, float]
    tags: list[dict[str, Any]]
    claimed_until: datetime | None = None

    def top_scores(self, count: int = 3) -> list[tuple[str, float]]:
        return sorted(self.scores.items(), key=lambda item: (-item[1], item[0]))[:count]


@dataclass(frozen=True)
class Stored:
    """One row of `imagemill_reviews`."""

    id: int
    uri: str
    etag: str
    decision: str
    reviewer: str
    note: str | None
    decided_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "uri": self.uri,
            "etag": self.etag,
            "decision": self.decision,
            "reviewer": self.reviewer,
            "note": self.note,
            "decided_at": self.decided_at.isoformat(),
        }


@dataclass
class Counts:
    left: int
    done: int
    mine: int


@dataclass
class Claimed:
    items: list[Item]
    expired: int = 0  # leases that had run out, found and cleared while claiming
    next_after: str | None = field(default=None)


class Pool:
    """A few autocommit connections for the app's request threads: taken one per call, returned
    after; a broken connection is dropped, never handed out again."""

    def __init__(self, conninfo: str, url: str, idle: int = 8) -> None:
        self._conninfo = conninfo
        self._url = url
        self._idle: queue.LifoQueue[psycopg.Connection[Any]] = queue.LifoQueue(maxsize=idle)
        self._lock = threading.Lock()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        conn = self._take()
        try:
            yield conn
        except psycopg.OperationalError:
            conn.close()
            raise
        if conn.broken or conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.close()
            return
        try:
            self._idle.put_nowait(conn)
        except queue.Full:
            conn.close()

    def _take(self) -> psycopg.Connection[Any]:
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                break
            if not (conn.closed or conn.broken):
                return conn
        try:
            conn = psycopg.connect(
                self._conninfo, autocommit=True, connect_timeout=10, application_name="imagemill-review"
            )
        except psycopg.OperationalError as exc:
            raise psycopg.OperationalError(scrub_secret(str(exc), self._url)) from None
        # the queue's queries look costly to the planner (a view, subqueries) but touch a page of
        # rows: JIT-compiling them would cost more than running them
        conn.execute("SET jit = off")
        return conn

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


def audit_threshold(rate: float) -> int:
    """Uris whose hash is below this are in the audit sample."""
    return min(int(rate * AUDIT_SPACE), AUDIT_SPACE)


class ReviewStore:
    """The queue, claims and decisions over one records table (`postgresql://…[?table=]`)."""

    def __init__(self, url: str, audit_rate: float = 0.01, lease_s: int = 300) -> None:
        self._url = url
        self._records = PostgresStore(url)
        self._table = self._records.table
        self._view = sql.Identifier(current_view(self._table))
        self._threshold = audit_threshold(audit_rate)
        self.lease_s = lease_s
        conninfo, _ = split_table(url)
        self._pool = Pool(conninfo, url)

    @property
    def table(self) -> str:
        return self._table

    # -- set-up ----------------------------------------------------------------------------------

    def setup(self) -> None:
        """Connect, create the records table (the store's own code) and the review tables and
        indexes; UserError in one line when the database cannot be reached."""
        try:
            self._records.check()
            self._records.close()
            with self._pool.connection() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                for statement in _schema(self._table):
                    conn.execute(statement)
            conn.execute(f"ANALYZE {CLAIMS}, {REVIEWS}")
        except psycopg.OperationalError as exc:
            raise UserError(f"cannot connect to {redact_url(self._url)}: {exc}") from None

    def close(self) -> None:
        self._pool.close()

    def ping(self) -> None:
        """A round trip to the database (psycopg.Error when it is away)."""
        with self._pool.connection() as conn:
            conn.execute("SELECT 1")

    # -- the queue -------------------------------------------------------------------------------

    def claim(self, reviewer: str, limit: int, filters: Filters = Filters(), after: str = "") -> Claimed:
        """Up to `limit` queued items, in uri order after `after`, claimed for `reviewer` for the
        lease: the reviewer's own live claims come back (renewed), others' never do."""
        expired = 0
        mine: dict[tuple[str, str], Item] = {}
        with self._pool.connection() as conn:
            with conn.transaction():
                expired = len(conn.execute(f"DELETE FROM {CLAIMS} WHERE expires_at <= now() RETURNING 1").fetchall())
            for _ in range(CLAIM_ROUNDS):
                wanted = limit - len(mine)
                if wanted <= 0:
                    break
                candidates = [
                    item
                    for item in self._candidates(conn, reviewer, wanted, filters, after)
                    if (item.uri, item.etag) not in mine
                ]
                if not candidates:
                    break
                won = self._take(conn, reviewer, candidates)
                mine.update({(item.uri, item.etag): item for item in candidates if (item.uri, item.etag) in won})
                if len(won) == len(candidates):
                    break
        items = sorted(mine.values(), key=lambda item: (item.uri, item.etag))
        return Claimed(items, expired, items[-1].uri if len(items) == limit else None)

    def _candidates(
        self, conn: psycopg.Connection[Any], reviewer: str, limit: int, filters: Filters, after: str
    ) -> list[Item]:
        # the flagged half and the audit half each walk their own partial index in uri order and
        # stop at `limit`; the two short lists are merged (an OR of both would scan and sort)
        branches = []
        params: dict[str, Any] = {}
        for half in (_FLAGGED, _AUDIT):
            where, params = self._queue_where(filters, half)
            branches.append(
                sql.SQL(
                    "(SELECT r.uri, r.etag, r.job_id, r.flagged, r.caption,"
                    " r.record -> 'moderation' -> 'scores' AS scores, r.record -> 'tags' -> 'labels' AS tags"
                    " FROM {view} AS r WHERE {where} AND r.uri > %(after)s"
                    " AND NOT EXISTS (SELECT 1 FROM {claims} AS c WHERE c.uri = r.uri AND c.etag = r.etag"
                    # OFFSET 0 keeps this a probe of the claims' primary key per record: as a join,
                    # a misjudged filter (jsonb scores) makes the planner scan the claims per record
                    " AND c.expires_at > now() AND c.reviewer <> %(reviewer)s OFFSET 0)"
                    " ORDER BY r.uri, r.etag LIMIT %(limit)s)"
                ).format(view=self._view, where=where, claims=sql.Identifier(CLAIMS))
            )
        if self._threshold == 0:
            branches.pop()  # no audit sample
        query = sql.SQL("SELECT * FROM ({}) AS q ORDER BY uri, etag LIMIT %(limit)s").format(
            sql.SQL(" UNION ALL ").join(branches)
        )
        params.update(after=after, reviewer=reviewer, limit=limit)
        with conn.cursor(row_factory=dict_row) as cur:
            # never a prepared (generic) plan: the best plan depends on the filters' values
            return [self._item(row) for row in cur.execute(query, params, prepare=False).fetchall()]

    def _take(self, conn: psycopg.Connection[Any], reviewer: str, items: Sequence[Item]) -> set[tuple[str, str]]:
        """Claim `items`; the ones another reviewer claimed first (their transaction won) are left out."""
        query = sql.SQL(
            "INSERT INTO {claims} AS c (uri, etag, reviewer, expires_at)"
            " SELECT k.uri, k.etag, %s, now() + make_interval(secs => %s)"
            " FROM unnest(%s::text[], %s::text[]) AS k(uri, etag)"
            " ON CONFLICT (uri, etag) DO UPDATE SET reviewer = EXCLUDED.reviewer, expires_at = EXCLUDED.expires_at"
            " WHERE c.reviewer = EXCLUDED.reviewer OR c.expires_at <= now()"
            " RETURNING c.uri, c.etag"
        ).format(claims=sql.Identifier(CLAIMS))
        uris = [item.uri for item in items]
        etags = [item.etag for item in items]
        with conn.transaction():
            rows = conn.execute(query, (reviewer, self.lease_s, uris, etags)).fetchall()
        return {(uri, etag) for uri, etag in rows}

    def _queue_where(self, filters: Filters, half: str = "") -> tuple[sql.Composable, dict[str, Any]]:
        """The queue's condition on a record `r`: both halves (flagged, audit sample), or one."""
        audit = sql.SQL(AUDIT_HASH.format(uri="r.uri"))
        sample = sql.SQL("r.flagged IS FALSE AND {} < %(threshold)s").format(audit)
        which = {
            _FLAGGED: sql.SQL("r.flagged"),
            _AUDIT: sample,
            "": sql.SQL("(r.flagged OR ({}))").format(sample),
        }[half]
        parts: list[sql.Composable] = [
            sql.SQL("r.error_kind IS NULL"),
            which,
            sql.SQL(
                "coalesce((SELECT d.decision FROM {reviews} AS d WHERE d.uri = r.uri AND d.etag = r.etag"
                " ORDER BY d.id DESC LIMIT 1), 'undo') = 'undo'"
            ).format(reviews=sql.Identifier(REVIEWS)),
        ]
        params: dict[str, Any] = {"threshold": self._threshold}
        if filters.job_id is not None:
            parts.append(sql.SQL("r.job_id = %(job_id)s"))
            params["job_id"] = filters.job_id
        if filters.label is not None:
            score = sql.SQL("(r.record -> 'moderation' -> 'scores' ->> %(label)s)::float8")
            params["label"] = filters.label
            parts.append(sql.SQL("r.record -> 'moderation' -> 'scores' ? %(label)s"))
        else:
            score = sql.SQL(
                "(SELECT max(s.value::float8) FROM jsonb_each_text(r.record -> 'moderation' -> 'scores') AS s)"
            )
        if filters.min_score is not None:
            parts.append(sql.SQL("{} >= %(min_score)s").format(score))
            params["min_score"] = filters.min_score
        if filters.max_score is not None:
            parts.append(sql.SQL("{} <= %(max_score)s").format(score))
            params["max_score"] = filters.max_score
        return sql.SQL(" AND ").join(parts), params

    def _item(self, row: dict[str, Any]) -> Item:
        scores = row["scores"] if isinstance(row["scores"], dict) else {}
        tags = row["tags"] if isinstance(row["tags"], list) else []
        return Item(
            uri=row["uri"],
            etag=row["etag"],
            job_id=row["job_id"],
            flagged=bool(row["flagged"]),
            reason="flagged" if row["flagged"] else "audit",
            caption=row["caption"],
            scores={str(k): float(v) for k, v in scores.items() if isinstance(v, int | float)},
            tags=[t for t in tags if isinstance(t, dict)],
        )

    def queue_size(self, filters: Filters = Filters()) -> int:
        """Items left to decide (claimed or not)."""
        where, params = self._queue_where(filters)
        query = sql.SQL("SELECT count(*) FROM {view} AS r WHERE {where}").format(view=self._view, where=where)
        with self._pool.connection() as conn:
            row = conn.execute(query, params).fetchone()
        return int(row[0]) if row else 0

    def counts(self, reviewer: str, filters: Filters = Filters()) -> Counts:
        """Left in the queue (under the filters); items decided, in all and by `reviewer`."""
        query = sql.SQL(
            "SELECT count(*), count(*) FILTER (WHERE reviewer = %s) FROM"
            " (SELECT DISTINCT ON (uri, etag) decision, reviewer FROM {reviews} ORDER BY uri, etag, id DESC) AS latest"
            " WHERE decision <> 'undo'"
        ).format(reviews=sql.Identifier(REVIEWS))
        with self._pool.connection() as conn:
            row = conn.execute(query, (reviewer,)).fetchone()
        done, mine = (int(row[0]), int(row[1])) if row else (0, 0)
        return Counts(left=self.queue_size(filters), done=done, mine=mine)

    def has_record(self, uri: str, etag: str | None = None) -> bool:
        """Whether the store holds a current record of `uri` (with this etag, when given)."""
        query = sql.SQL("SELECT 1 FROM {view} WHERE uri = %s AND (%s::text IS NULL OR etag = %s) LIMIT 1").format(
            view=self._view
        )
        with self._pool.connection() as conn:
            return conn.execute(query, (uri, etag, etag)).fetchone() is not None

    # -- decisions -------------------------------------------------------------------------------

    def decide(self, reviewer: str, uri: str, etag: str, decision: Decision, note: str | None) -> Stored:
        """Append a decision. NotFound: no current record (uri, etag); HeldByAnother: someone
        else's live claim. The reviewer's claim on it ends."""
        record = sql.SQL("SELECT 1 FROM {view} WHERE uri = %s AND etag = %s").format(view=self._view)
        with self._pool.connection() as conn, conn.transaction():
            if conn.execute(record, (uri, etag)).fetchone() is None:
                raise NotFound(f"no current record of {uri} with etag {etag!r}")
            holder = conn.execute(
                f"SELECT reviewer FROM {CLAIMS} WHERE uri = %s AND etag = %s AND expires_at > now() FOR UPDATE",
                (uri, etag),
            ).fetchone()
            if holder is not None and holder[0] != reviewer:
                raise HeldByAnother(holder[0])
            stored = self._append(conn, uri, etag, str(decision), reviewer, note)
            conn.execute(f"DELETE FROM {CLAIMS} WHERE uri = %s AND etag = %s", (uri, etag))
        return stored

    def undo(self, reviewer: str) -> tuple[Stored, Item | None]:
        """Take back the reviewer's latest decision that still stands: an `undo` row is appended and
        the item is theirs again for a lease. NotFound when nothing of theirs stands."""
        last = sql.SQL(
            "SELECT d.id, d.uri, d.etag, d.decision, d.reviewer, d.note, d.decided_at FROM {reviews} AS d"
            " WHERE d.reviewer = %s AND d.decision <> 'undo' AND NOT EXISTS"
            " (SELECT 1 FROM {reviews} AS l WHERE l.uri = d.uri AND l.etag = d.etag AND l.id > d.id)"
            " ORDER BY d.id DESC LIMIT 1"
        ).format(reviews=sql.Identifier(REVIEWS))
        with self._pool.connection() as conn, conn.transaction():
            row = conn.execute(last, (reviewer,)).fetchone()
            if row is None:
                raise NotFound("no decision of yours to undo")
            undone = Stored(*row)
            # one undo per decision, even when the same reviewer undoes from two tabs at once
            conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s || ' ' || %s, 0))", (undone.uri, undone.etag)
            )
            latest = conn.execute(
                f"SELECT id FROM {REVIEWS} WHERE uri = %s AND etag = %s ORDER BY id DESC LIMIT 1",
                (undone.uri, undone.etag),
            ).fetchone()
            if latest is None or latest[0] != undone.id:
                raise NotFound("your last decision was just changed; reload the page")
            self._append(conn, undone.uri, undone.etag, UNDO, reviewer, None)
            conn.execute(
                f"INSERT INTO {CLAIMS} (uri, etag, reviewer, expires_at)"
                " VALUES (%s, %s, %s, now() + make_interval(secs => %s))"
                " ON CONFLICT (uri, etag) DO UPDATE SET reviewer = EXCLUDED.reviewer, expires_at = EXCLUDED.expires_at",
                (undone.uri, undone.etag, reviewer, self.lease_s),
            )
            item = self._one_item(conn, undone.uri, undone.etag)
        return undone, item

    def _one_item(self, conn: psycopg.Connection[Any], uri: str, etag: str) -> Item | None:
        query = sql.SQL(
            "SELECT r.uri, r.etag, r.job_id, r.flagged, r.caption, r.record -> 'moderation' -> 'scores' AS scores,"
            " r.record -> 'tags' -> 'labels' AS tags FROM {view} AS r WHERE r.uri = %s AND r.etag = %s"
        ).format(view=self._view)
        with conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(query, (uri, etag)).fetchone()
        return self._item(row) if row else None

    def _append(
        self, conn: psycopg.Connection[Any], uri: str, etag: str, decision: str, reviewer: str, note: str | None
    ) -> Stored:
        row = conn.execute(
            f"INSERT INTO {REVIEWS} (uri, etag, decision, reviewer, note) VALUES (%s, %s, %s, %s, %s)"
            " RETURNING id, uri, etag, decision, reviewer, note, decided_at",
            (uri, etag, decision, reviewer, note),
        ).fetchone()
        assert row is not None
        return Stored(*row)

    def decisions(self, everything: bool = False) -> Iterator[Stored]:
        """The decisions that stand (latest per item, undone ones left out), oldest first; with
        `everything`, every row of the log, undos included. Streamed from a server-side cursor."""
        if everything:
            query = f"SELECT id, uri, etag, decision, reviewer, note, decided_at FROM {REVIEWS} ORDER BY id"
        else:
            query = (
                "SELECT id, uri, etag, decision, reviewer, note, decided_at FROM"
                f" (SELECT DISTINCT ON (uri, etag) * FROM {REVIEWS} ORDER BY uri, etag, id DESC) AS latest"
                " WHERE decision <> 'undo' ORDER BY id"
            )
        with self._pool.connection() as conn, conn.transaction(), conn.cursor(name="imagemill_export") as cur:
            cur.execute(query)
            for row in cur:
                yield Stored(*row)


def _schema(table: str) -> list[sql.SQL | sql.Composed]:
    records = sql.Identifier(table)
    audit = sql.SQL(AUDIT_HASH.format(uri="uri"))
    return [
        sql.SQL(
            f"CREATE TABLE IF NOT EXISTS {CLAIMS} ("
            " uri text NOT NULL, etag text NOT NULL, reviewer text NOT NULL, expires_at timestamptz NOT NULL,"
            " PRIMARY KEY (uri, etag))"
        ),
        sql.SQL(f"CREATE INDEX IF NOT EXISTS {CLAIMS}_expires_idx ON {CLAIMS} (expires_at)"),
        # a small table that churns: analyzed every 100 changed rows, or the planner takes it for
        # empty and scans it once per queued record instead of probing its key
        sql.SQL(f"ALTER TABLE {CLAIMS} SET (autovacuum_analyze_scale_factor = 0, autovacuum_analyze_threshold = 100)"),
        sql.SQL(
            f"CREATE TABLE IF NOT EXISTS {REVIEWS} ("
            " id bigserial PRIMARY KEY, uri text NOT NULL, etag text NOT NULL,"
            " decision text NOT NULL CHECK (decision IN ('approve', 'reject', 'escalate', 'undo')),"
            " reviewer text NOT NULL, note text, decided_at timestamptz NOT NULL DEFAULT now())"
        ),
        sql.SQL(f"CREATE INDEX IF NOT EXISTS {REVIEWS}_key_idx ON {REVIEWS} (uri, etag, id DESC)"),
        sql.SQL(f"CREATE INDEX IF NOT EXISTS {REVIEWS}_reviewer_idx ON {REVIEWS} (reviewer, id DESC)"),
        # the flagged half in uri order (within a job, too); the audit half by its hash, which is
        # the more selective condition (a 1 % sample is sorted after the index finds it)
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (uri, etag) WHERE flagged AND error_kind IS NULL").format(
            sql.Identifier(f"{table}_review_idx"), records
        ),
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (job_id, uri, etag) WHERE flagged AND error_kind IS NULL").format(
            sql.Identifier(f"{table}_review_job_idx"), records
        ),
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({}) WHERE flagged IS FALSE AND error_kind IS NULL").format(
            sql.Identifier(f"{table}_audit_idx"), records, audit
        ),
    ]
