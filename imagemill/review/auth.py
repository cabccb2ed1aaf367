"""Who is asking: reviewers' Bearer tokens for the API, signed session cookies for the page.

Tokens are compared in constant time (`hmac.compare_digest`, against every reviewer's, so the time
taken says nothing about which one nearly matched) and are never logged, echoed or stored in the
cookie: the cookie holds the reviewer's name, a CSRF token and a fingerprint of their token, so a
changed token ends that reviewer's sessions.
"""

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeTimedSerializer

SESSION_COOKIE = "imagemill_review"
LOGIN_COOKIE = "imagemill_review_login"
CSRF_HEADER = "x-csrf-token"


@dataclass(frozen=True)
class Session:
    reviewer: str
    csrf: str


def _fingerprint(token: str) -> str:
    return hashlib.sha256(b"imagemill-review-token\x00" + token.encode()).hexdigest()[:16]


class Authenticator:
    def __init__(self, tokens: dict[str, str], secret: bytes, session_s: int, metrics_token: str | None = None) -> None:
        self._tokens = dict(tokens)
        self._metrics_token = metrics_token
        self._session_s = session_s
        self._sessions = URLSafeTimedSerializer(secret, salt="imagemill-review-session")
        self._logins = URLSafeTimedSerializer(secret, salt="imagemill-review-login")

    @property
    def session_s(self) -> int:
        return self._session_s

    def reviewer_for(self, token: str) -> str | None:
        """The reviewer whose token this is, or None. Every reviewer's token is compared."""
        found = None
        given = token.encode()
        for reviewer, expected in self._tokens.items():
            if hmac.compare_digest(given, expected.encode()):
                found = reviewer
        return found

    def bearer(self, authorization: str | None) -> str | None:
        """`Authorization: Bearer <token>` -> the reviewer, or None."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self.reviewer_for(token.strip())

    def may_read_metrics(self, authorization: str | None) -> bool:
        if self.bearer(authorization) is not None:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        return (
            self._metrics_token is not None
            and scheme.lower() == "bearer"
            and hmac.compare_digest(token.strip().encode(), self._metrics_token.encode())
        )

    def new_session(self, reviewer: str) -> tuple[str, Session]:
        """A signed cookie value for `reviewer`, and the session it stands for."""
        session = Session(reviewer, secrets.token_urlsafe(32))
        value = self._sessions.dumps({"r": reviewer, "c": session.csrf, "f": _fingerprint(self._tokens[reviewer])})
        return value, session

    def session(self, cookie: str | None) -> Session | None:
        """The session a cookie stands for: signed by us, younger than the session length, and of a
        reviewer whose token has not changed since; else None."""
        if not cookie:
            return None
        try:
            data = self._sessions.loads(cookie, max_age=self._session_s)
        except BadSignature:
            return None
        if not isinstance(data, dict):
            return None
        reviewer, csrf, fingerprint = data.get("r"), data.get("c"), data.get("f")
        if not (isinstance(reviewer, str) and isinstance(csrf, str) and isinstance(fingerprint, str)):
            return None
        token = self._tokens.get(reviewer)
        if token is None or not hmac.compare_digest(fingerprint, _fingerprint(token)):
            return None
        return Session(reviewer, csrf)

    def login_nonce(self) -> tuple[str, str]:
        """A nonce for the login form and the signed cookie that must come back with it (so another
        site cannot log a browser in as someone else)."""
        nonce = secrets.token_urlsafe(24)
        return nonce, self._logins.dumps(nonce)

    def login_nonce_ok(self, cookie: str | None, nonce: str) -> bool:
        if not cookie or not nonce:
            return False
        try:
            expected = self._logins.loads(cookie, max_age=3600)
        except BadSignature:
            return False
        return isinstance(expected, str) and hmac.compare_digest(expected.encode(), nonce.encode())


def csrf_ok(session: Session, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(session.csrf.encode(), (given or "").encode())
