"""Who is asking: reviewers' Bearer tokens for the API, server-side sessions for the page, or an auth proxy.

Tokens are compared in constant time and are never logged, echoed or stored: a session row holds
the reviewer's name, role, a CSRF token and a fingerprint of their token, so a changed token ends
that reviewer's sessions. In proxy mode (`IMAGEMILL_REVIEW_AUTH=proxy`, as Grafana's auth proxy)
the reviewer's name comes from a header, believed only when the TCP peer that sent the request (the
socket's address, never a forwarded one) is inside `IMAGEMILL_REVIEW_PROXY_ADDRESSES`.
"""

import hashlib
import hmac
import ipaddress
import logging
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeTimedSerializer

from imagemill.review.sessions import Session, Sessions
from imagemill.review.settings import AUTO, REVIEWER_NAME, Reviewer, Role, Tokens

log = logging.getLogger("imagemill.review")

SESSION_COOKIE = "imagemill_review"
LOGIN_COOKIE = "imagemill_review_login"
CSRF_HEADER = "x-csrf-token"


def fingerprint(token: str) -> str:
    return hashlib.sha256(b"imagemill-review-token\x00" + token.encode()).hexdigest()[:16]


class ProxyAuth:
    """The trusted-proxy mode: a request names its reviewer in `header` and is believed only when its
    TCP peer is one of the proxies' networks. Leads: a group in `role_header` among `lead_groups`, or
    the role the tokens file gives that name."""

    def __init__(
        self,
        header: str,
        networks: Sequence[str],
        tokens: Tokens,
        role_header: str | None = None,
        lead_groups: Sequence[str] = ("lead",),
        logout_url: str | None = None,
    ) -> None:
        self.header = header.lower()
        self._networks = [ipaddress.ip_network(text, strict=False) for text in networks]
        self._tokens = tokens
        self._role_header = role_header.lower() if role_header else None
        self._lead_groups = frozenset(lead_groups)
        self.logout_url = logout_url

    def trusted(self, peer: str | None) -> bool:
        """Whether the socket's peer address is one of the proxies'."""
        if not peer:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self._networks)

    def reviewer(self, peer: str | None, headers: Mapping[str, str]) -> Reviewer | None:
        """The reviewer the proxy names; None without the header, from any other peer (logged), or
        for a name that is not a reviewer's name."""
        name = (headers.get(self.header) or "").strip()
        if not name:
            return None
        if not self.trusted(peer):
            log.warning("ignored %s from %s: not one of IMAGEMILL_REVIEW_PROXY_ADDRESSES", self.header, peer)
            return None
        if not REVIEWER_NAME.fullmatch(name) or name == AUTO:
            log.warning("ignored %s: %r is not a reviewer name", self.header, name[:64])
            return None
        groups = (
            {part.strip() for part in (headers.get(self._role_header) or "").split(",")} if self._role_header else set()
        )
        if groups & self._lead_groups:
            return Reviewer(name, Role.LEAD)
        return self._tokens.reviewer(name)


@dataclass(frozen=True)
class Caller:
    """An identified request: the reviewer, and the CSRF token its page writes must carry (None for
    a Bearer token, which a browser never sends by itself)."""

    reviewer: Reviewer
    csrf: str | None


class Authenticator:
    def __init__(
        self,
        tokens: Tokens,
        sessions: Sessions,
        key: bytes,
        metrics_token: str | None = None,
        proxy: ProxyAuth | None = None,
    ) -> None:
        self._tokens = tokens
        self.sessions = sessions
        self._key = key
        self._metrics_token = metrics_token
        self.proxy = proxy
        self._logins = URLSafeTimedSerializer(key, salt="imagemill-review-login")

    def fingerprints(self) -> dict[str, str]:
        return {name: fingerprint(token) for name, token in self._tokens.tokens.items()}

    def token_reviewer(self, token: str) -> Reviewer | None:
        """The reviewer whose token this is, or None. Every reviewer's token is compared."""
        found = None
        given = token.encode()
        for name, expected in self._tokens.tokens.items():
            if hmac.compare_digest(given, expected.encode()):
                found = name
        return self._tokens.reviewer(found) if found else None

    def login(self, name: str, token: str) -> Reviewer | None:
        """The reviewer `name` when `token` is theirs, else None (compared in constant time whether
        or not the name is a reviewer's)."""
        expected = self._tokens.tokens.get(name)
        # an unknown name is compared against a stand-in, so the time says nothing about which names exist
        ok = hmac.compare_digest(token.encode(), (expected or "\x00" * 32).encode())
        return self._tokens.reviewer(name) if ok and expected is not None else None

    def bearer(self, authorization: str | None) -> Reviewer | None:
        """`Authorization: Bearer <token>` -> the reviewer, or None."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self.token_reviewer(token.strip())

    def may_read_metrics(self, authorization: str | None) -> bool:
        if self.bearer(authorization) is not None:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        return (
            self._metrics_token is not None
            and scheme.lower() == "bearer"
            and hmac.compare_digest(token.strip().encode(), self._metrics_token.encode())
        )

    def new_session(self, reviewer: Reviewer) -> tuple[str, Session]:
        return self.sessions.create(reviewer, fingerprint(self._tokens.tokens[reviewer.name]))

    def session(self, cookie: str | None) -> Session | None:
        """The live session of a cookie, of a reviewer whose token has not changed since; else None."""
        found = self.sessions.get(cookie)
        if found is None:
            return None
        session, kept = found
        token = self._tokens.tokens.get(session.reviewer.name)
        if token is None or not hmac.compare_digest(kept, fingerprint(token)):
            self.sessions.revoke(cookie)
            return None
        # the role is the tokens file's now, not the one at login
        return Session(self._tokens.reviewer(session.reviewer.name), session.csrf)

    def proxy_csrf(self, reviewer: str) -> str:
        """Proxy mode's CSRF token of a reviewer: no session to keep one in, so it is derived."""
        return hmac.new(self._key, b"imagemill-review-csrf\x00" + reviewer.encode(), hashlib.sha256).hexdigest()

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


def csrf_ok(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest((expected or "").encode(), (given or "").encode())
