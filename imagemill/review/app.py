"""The review app: server-rendered pages, a JSON API, images, health and metrics (Starlette).

Every route but `/healthz`, `/login` and `/static/*` needs a reviewer: the API a Bearer token or the
page's session (writes from the page also carry its CSRF token in `X-CSRF-Token`), or in proxy mode
the auth proxy's header; without one, the API answers 401 and pages redirect to the login form.
While the database is away the API answers JSON 503. Database and S3 calls are blocking, so each
runs on Starlette's thread pool.
"""

import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, quote, urlencode

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from imagemill.core.errors import ImageError
from imagemill.review.auth import CSRF_HEADER, LOGIN_COOKIE, SESSION_COOKIE, Authenticator, Caller, csrf_ok
from imagemill.review.db import DATABASE_DOWN
from imagemill.review.sessions import LoginLimits
from imagemill.review.store import (
    OUTCOME,
    Claimed,
    Conflict,
    Decision,
    Filters,
    HeldByAnother,
    Item,
    NotFound,
    NotLead,
    Queue,
    ReviewStore,
    Sort,
)
from imagemill.review.tags import ReviewTagger
from imagemill.review.thumbnails import Thumbnails, safe_uri

log = logging.getLogger("imagemill.review")

HERE = Path(__file__).parent
MAX_LIMIT = 200
MAX_NOTE = 2000
# the scope key the socket's peer address is kept under, before X-Forwarded-For replaces `client`
PEER = "imagemill.peer"
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self'; object-src 'none'; frame-ancestors 'none'; base-uri 'none';"
        b" form-action 'self'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class DecisionBody(BaseModel):
    """`POST /api/decisions`."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    uri: str = Field(min_length=1, max_length=4096)
    etag: str | None = Field(default=None, max_length=256)
    decision: Decision
    note: Annotated[str, Field(max_length=MAX_NOTE)] | None = None
    reason: Annotated[str, Field(max_length=40)] | None = None
    override: bool = False


class ItemKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uri: str = Field(min_length=1, max_length=4096)
    etag: str = Field(default="", max_length=256)


class ClaimsBody(BaseModel):
    """`POST /api/claims/renew` and `/api/claims/release` (`all`: every claim of the caller)."""

    model_config = ConfigDict(extra="forbid")

    items: list[ItemKey] = Field(default_factory=list, max_length=MAX_LIMIT)
    all: bool = False


@dataclass
class Metrics:
    registry: CollectorRegistry
    decisions: Counter
    expiries: Counter
    thumbnail_seconds: Histogram


class _QueueGauges(Collector):
    """Read at each scrape: the queue's counts, each reviewer's standing decisions and decisions in
    the last hour, and the agreement of second looks."""

    def __init__(self, store: ReviewStore) -> None:
        self._store = store

    def collect(self) -> list[Metric]:
        try:
            counts = self._store.counts("")
            reviewers = self._store.reviewer_stats()
            agreement = self._store.agreement()
        except DATABASE_DOWN:
            return []  # the database is away: no sample rather than a wrong one
        size = GaugeMetricFamily("imagemill_review_queue_size", "Items left to decide (flagged and audit sample)")
        size.add_metric([], counts.left)
        waiting = GaugeMetricFamily(
            "imagemill_review_waiting", "Items waiting for a lead or a second look", labels=["kind"]
        )
        waiting.add_metric(["escalated"], counts.escalated)
        waiting.add_metric(["second_look"], counts.second_looks)
        standing = GaugeMetricFamily(
            "imagemill_review_reviewer_standing",
            "Current items whose standing decision is the reviewer's",
            labels=["reviewer"],
        )
        hour = GaugeMetricFamily(
            "imagemill_review_reviewer_decisions_last_hour", "Decisions in the last hour", labels=["reviewer"]
        )
        for row in reviewers:
            standing.add_metric([row.reviewer], row.standing)
            hour.add_metric([row.reviewer], row.last_hour)
        pairs = GaugeMetricFamily(
            "imagemill_review_second_look_pairs", "Second looks and the decisions they looked at", labels=["first"]
        )
        agreed = GaugeMetricFamily(
            "imagemill_review_second_look_agreed", "Second looks that agreed with the first decision", labels=["first"]
        )
        for share in agreement:
            pairs.add_metric([share.first], share.pairs)
            agreed.add_metric([share.first], share.agreed)
        return [size, waiting, standing, hour, pairs, agreed]


def _metrics(store: ReviewStore) -> Metrics:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_QueueGauges(store))
    return Metrics(
        registry,
        Counter(
            "imagemill_review_decisions",
            "Decisions stored, by reviewer and outcome (undo included)",
            ["reviewer", "decision"],
            registry=registry,
        ),
        Counter("imagemill_review_lease_expiries", "Claims whose lease ran out before a decision", registry=registry),
        Histogram("imagemill_review_thumbnail_seconds", "Time to make a thumbnail (cache misses)", registry=registry),
    )


class SecurityHeaders:
    """Adds the security headers to every response, and no-store to everything but assets and thumbnails."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in SECURITY_HEADERS if name not in names]
                if b"cache-control" not in names and not path.startswith("/static/"):
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


class PeerAddress:
    """Keeps the socket's peer address (`scope[PEER]`) before X-Forwarded-For may replace the
    client's: the trusted-proxy mode decides by the peer, never by what a header says."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            client = scope.get("client")
            scope[PEER] = client[0] if client else None
        await self.app(scope, receive, send)


class BodyTooLarge(Exception):
    pass


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (BodyTooLarge) past `limit` bytes, declared or streamed."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def _unauthorized() -> JSONResponse:
    return _error(401, "a reviewer's token is needed: Authorization: Bearer <token>", **{"WWW-Authenticate": "Bearer"})


def _too_many(retry_after: int) -> JSONResponse:
    return _error(429, f"too many failed logins; try again in {retry_after} s", **{"Retry-After": str(retry_after)})


def thumbnail_url(item: Item) -> str:
    return "/api/thumbnail?" + urlencode({"uri": item.uri, "etag": item.etag}, quote_via=quote)


def image_url(item: Item) -> str:
    return "/api/image?" + urlencode({"uri": item.uri, "etag": item.etag}, quote_via=quote)


def item_json(item: Item) -> dict[str, Any]:
    return {
        "uri": item.uri,
        "etag": item.etag,
        "job_id": item.job_id,
        "scores": item.scores,
        "labels": [label.as_dict() for label in item.labels],
        "flagged": item.flagged,
        "caption": item.caption,
        "tags": item.tags,
        "reason": item.reason,
        "thumbnail_url": thumbnail_url(item),
        "image_url": image_url(item),
        "claimed_until": item.claimed_until.isoformat() if item.claimed_until else None,
        "cursor": item.cursor,
    }


def safe_next(target: str | None) -> str:
    """Where to go after logging in: only a path on this site, never `//host`, `/\\host` or
    `https://host` (an open redirect)."""
    if target and target.startswith("/") and not target.startswith(("//", "/\\")) and "\\" not in target:
        return target
    return "/"


def _three(value: float) -> str:
    """A score in three significant digits: 0.987, 0.0512, 1.00."""
    return f"{value:#.3g}" if value else "0"


class ReviewApp:
    """The routes and what they share: the store, the authenticator, images, metrics."""

    def __init__(
        self,
        store: ReviewStore,
        auth: Authenticator,
        limits: LoginLimits,
        thumbnails: Thumbnails,
        full_size: Thumbnails,
        *,
        page_size: int = 24,
        blur: bool = True,
        reveal_before_deciding: bool = True,
        reasons: tuple[str, ...] = (),
        page_idle_s: int = 300,
        counts_refresh_s: float = 300.0,
        max_body_bytes: int = 16_384,
        forwarded_allow_ips: str | None = None,
        tagger: ReviewTagger | None = None,
    ) -> None:
        self.store = store
        self.auth = auth
        self.limits = limits
        self.thumbnails = thumbnails
        self.full_size = full_size
        self.page_size = page_size
        self.blur = blur
        self.reveal_before_deciding = reveal_before_deciding
        self.reasons = reasons
        self.page_idle_s = page_idle_s
        self.counts_refresh_s = counts_refresh_s
        self.max_body_bytes = max_body_bytes
        self.forwarded_allow_ips = forwarded_allow_ips
        self.tagger = tagger
        self.metrics = _metrics(store)
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.templates.env.filters["three"] = _three

    # -- who is asking ----------------------------------------------------------------------------

    def _proxied(self, request: Request) -> Caller | None:
        proxy = self.auth.proxy
        if proxy is None:
            return None
        reviewer = proxy.reviewer(request.scope.get(PEER), request.headers)
        return Caller(reviewer, self.auth.proxy_csrf(reviewer.name)) if reviewer else None

    def _page_caller(self, request: Request) -> Caller | None:
        """The page's reviewer: the proxy's, or the session cookie's."""
        proxied = self._proxied(request)
        if proxied is not None:
            return proxied
        session = self.auth.session(request.cookies.get(SESSION_COOKIE))
        return Caller(session.reviewer, session.csrf) if session else None

    async def _caller(self, request: Request, write: bool) -> tuple[Caller | None, Response | None]:
        """The caller, or the response to send instead: 401 without credentials, 429 while its address
        has too many failures, 403 when a page write lacks its CSRF token."""
        authorization = request.headers.get("authorization")
        if authorization:
            address = {"address": request.client.host if request.client else ""}
            wait = await run_in_threadpool(self.limits.retry_after, address)
            if wait is not None:
                return None, _too_many(wait)
            reviewer = self.auth.bearer(authorization)
            if reviewer is None:
                await run_in_threadpool(self.limits.failed, address)
                return None, _unauthorized()
            return Caller(reviewer, None), None
        caller = await run_in_threadpool(self._page_caller, request)
        if caller is None:
            return None, _unauthorized()
        if write and not csrf_ok(caller.csrf, request.headers.get(CSRF_HEADER)):
            return None, _error(403, "missing or wrong CSRF token (X-CSRF-Token)")
        return caller, None

    def _secure(self, request: Request) -> bool:
        # the scheme comes from X-Forwarded-Proto only for the proxies IMAGEMILL_REVIEW_FORWARDED_ALLOW_IPS names
        return request.url.scheme == "https"

    def _client(self, request: Request) -> str:
        return request.client.host if request.client else ""

    # -- pages ------------------------------------------------------------------------------------

    async def login_page(self, request: Request) -> Response:
        if self.auth.proxy is not None:
            return RedirectResponse(safe_next(request.query_params.get("next")), status_code=303)
        return self._login_form(request, None, 200)

    def _login_form(self, request: Request, message: str | None, status: int, **headers: str) -> Response:
        nonce, cookie = self.auth.login_nonce()
        response = self.templates.TemplateResponse(
            request,
            "login.html",
            {"nonce": nonce, "next": safe_next(request.query_params.get("next")), "message": message},
            status_code=status,
            headers=headers or None,
        )
        response.set_cookie(
            LOGIN_COOKIE,
            cookie,
            max_age=3600,
            httponly=True,
            samesite="strict",
            secure=self._secure(request),
            path="/login",
        )
        return response

    async def login(self, request: Request) -> Response:
        if self.auth.proxy is not None:
            return PlainTextResponse("sign in through the auth proxy", status_code=404)
        try:
            form = _form(await read_body(request, self.max_body_bytes))
        except BodyTooLarge:
            return PlainTextResponse("request body too large", status_code=413)
        if not self.auth.login_nonce_ok(request.cookies.get(LOGIN_COOKIE), form.get("nonce", "")):
            return self._login_form(request, "The login form expired; try again.", 400)
        name = form.get("reviewer", "").strip()[:64]
        keys = {"address": self._client(request), "reviewer": name}
        wait = await run_in_threadpool(self.limits.retry_after, keys)
        if wait is not None:
            log.warning("login refused: too many failures", extra={"client": keys["address"], "reviewer": name})
            return self._login_form(
                request, f"Too many failed logins; try again in {wait} s.", 429, **{"Retry-After": str(wait)}
            )
        reviewer = self.auth.login(name, form.get("token", ""))
        if reviewer is None:
            await run_in_threadpool(self.limits.failed, keys)
            log.warning("login refused", extra={"client": keys["address"], "reviewer": name})
            return self._login_form(request, "That name and token are not a reviewer's.", 401)
        value, _ = await run_in_threadpool(self.auth.new_session, reviewer)
        log.info("login", extra={"reviewer": reviewer.name})
        response = RedirectResponse(safe_next(form.get("next")), status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            value,
            max_age=int(self.auth.sessions.session_s),
            httponly=True,
            samesite="strict",
            secure=self._secure(request),
        )
        response.delete_cookie(LOGIN_COOKIE, path="/login")
        return response

    async def logout(self, request: Request) -> Response:
        caller = await run_in_threadpool(self._page_caller, request)
        try:
            form = _form(await read_body(request, self.max_body_bytes))
        except BodyTooLarge:
            return PlainTextResponse("request body too large", status_code=413)
        if caller is not None and not csrf_ok(caller.csrf, form.get("csrf")):
            return PlainTextResponse("missing or wrong CSRF token", status_code=403)
        if caller is not None:
            # whatever the page held goes back to the queue now, not when the leases run out
            released = await run_in_threadpool(self.store.release, caller.reviewer.name)
            await run_in_threadpool(self.auth.sessions.revoke, request.cookies.get(SESSION_COOKIE))
            log.info("logout", extra={"reviewer": caller.reviewer.name, "released": released})
        proxy = self.auth.proxy
        target = (proxy.logout_url or "/") if proxy is not None else "/login"
        response = RedirectResponse(target, status_code=303)
        response.delete_cookie(SESSION_COOKIE, httponly=True, samesite="strict", secure=self._secure(request))
        return response

    async def queue_page(self, request: Request) -> Response:
        caller = await run_in_threadpool(self._page_caller, request)
        if caller is None:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse("/login?" + urlencode({"next": target}), status_code=303)
        try:
            filters, sort, queue = self._view(request)
        except HTTPException as exc:
            return PlainTextResponse(str(exc.detail), status_code=422)
        reviewer = caller.reviewer
        if queue is Queue.LEADS and not reviewer.lead:
            return PlainTextResponse("the leads' queue is for leads", status_code=403)
        try:
            claimed = await self._claim(
                caller, self.page_size, filters, request.query_params.get("after", ""), sort, queue
            )
        except ValueError as exc:
            return PlainTextResponse(str(exc), status_code=422)
        counts = await run_in_threadpool(self.store.counts, reviewer.name, filters, queue)
        query = {k: v for k, v in request.query_params.items() if k != "after" and v}
        next_url = "/?" + urlencode({**query, "after": claimed.next_after}) if claimed.next_after else None
        return self.templates.TemplateResponse(
            request,
            "queue.html",
            {
                "reviewer": reviewer,
                "csrf": caller.csrf,
                "items": [(item, thumbnail_url(item), image_url(item)) for item in claimed.items],
                "counts": counts,
                "filters": filters,
                "sort": sort,
                "queue": queue,
                "labels": self.store.labels,
                "reasons": self.reasons,
                "blur": self.blur,
                "reveal_before_deciding": self.reveal_before_deciding,
                "next_url": next_url,
                "lease_s": self.store.lease_s,
                "idle_s": self.page_idle_s,
                "proxy": self.auth.proxy is not None,
            },
        )

    async def stats_page(self, request: Request) -> Response:
        caller = await run_in_threadpool(self._page_caller, request)
        if caller is None:
            return RedirectResponse("/login?" + urlencode({"next": "/stats"}), status_code=303)
        stats = await run_in_threadpool(self._stats)
        return self.templates.TemplateResponse(
            request, "stats.html", {"reviewer": caller.reviewer, "csrf": caller.csrf, **stats}
        )

    def _stats(self) -> dict[str, Any]:
        return {
            "reviewers": self.store.reviewer_stats(),
            "agreement": self.store.agreement(),
            "counts": self.store.counts(""),
        }

    def _view(self, request: Request) -> tuple[Filters, Sort, Queue]:
        """Filters, sort and queue from the query string; HTTPException 422 on a bad value."""
        params = request.query_params

        def number(name: str) -> float | None:
            text = (params.get(name) or "").strip()
            if not text:
                return None
            try:
                value = float(text)
            except ValueError:
                raise HTTPException(422, f"{name} must be a number") from None
            if value != value or value in (float("inf"), float("-inf")):
                raise HTTPException(422, f"{name} must be a finite number")
            return value

        job = (params.get("job") or "").strip() or None
        label = (params.get("label") or "").strip() or None
        if job and len(job) > 256:
            raise HTTPException(422, "job is at most 256 characters")
        if label is not None and label not in self.store.labels:
            raise HTTPException(422, f"label must be one with a threshold: {', '.join(self.store.labels)}")

        def choice(name: str, kind: Callable[[str], Any], default: Any) -> Any:
            text = (params.get(name) or "").strip()
            try:
                return kind(text) if text else default
            except ValueError:
                raise HTTPException(422, f"{name} must be one of {', '.join(kind.__members__.values())}") from None  # type: ignore[attr-defined]

        filters = Filters(job_id=job, label=label, min_score=number("min"), max_score=number("max"))
        return filters, choice("sort", Sort, Sort.SCORE), choice("queue", Queue, Queue.PEOPLE)

    # -- API --------------------------------------------------------------------------------------

    async def _claim(
        self, caller: Caller, limit: int, filters: Filters, after: str, sort: Sort, queue: Queue
    ) -> Claimed:
        if len(after) > 8192:
            raise ValueError("after is at most 8192 characters")
        claimed = await run_in_threadpool(self.store.claim, caller.reviewer, limit, filters, after, sort, queue)
        if claimed.expired:
            self.metrics.expiries.inc(claimed.expired)
        return claimed

    async def api_queue(self, request: Request) -> Response:
        caller, refused = await self._caller(request, write=False)
        if refused is not None or caller is None:
            return refused or _unauthorized()
        text = request.query_params.get("limit", str(self.page_size))
        if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
            return _error(422, f"limit must be a whole number from 1 to {MAX_LIMIT}")
        filters, sort, queue = self._view(request)
        try:
            claimed = await self._claim(caller, int(text), filters, request.query_params.get("after", ""), sort, queue)
        except NotLead as exc:
            return _error(403, str(exc))
        except ValueError as exc:
            return _error(422, str(exc))
        return JSONResponse(
            {
                "reviewer": caller.reviewer.name,
                "role": str(caller.reviewer.role),
                "lease_s": self.store.lease_s,
                "items": [item_json(item) for item in claimed.items],
                "next_after": claimed.next_after,
            }
        )

    async def api_counts(self, request: Request) -> Response:
        caller, refused = await self._caller(request, write=False)
        if refused is not None or caller is None:
            return refused or _unauthorized()
        filters, _, queue = self._view(request)
        counts = await run_in_threadpool(self.store.counts, caller.reviewer.name, filters, queue)
        return JSONResponse(counts.as_dict())

    async def _write_with_body(self, request: Request, model: type[BaseModel]) -> tuple[Caller, Any] | Response:
        """A write's caller and its JSON body, or the response to send instead (401, 403, 429, 413, 422)."""
        caller, refused = await self._caller(request, write=True)
        if refused is not None or caller is None:
            return refused or _unauthorized()
        body = await self._json_body(request, model)
        if isinstance(body, Response):
            return body
        return caller, body

    async def _json_body(self, request: Request, model: type[BaseModel]) -> Any:
        try:
            raw = await read_body(request, self.max_body_bytes)
        except BodyTooLarge:
            return _error(413, f"request body over {self.max_body_bytes} bytes")
        try:
            parsed = json.loads(raw) if raw.strip() else {}
        except ValueError:
            return _error(422, "the body is not JSON")
        try:
            return model.model_validate(parsed)
        except ValidationError as exc:
            return _error(422, _describe(exc))

    async def api_decide(self, request: Request) -> Response:
        asked = await self._write_with_body(request, DecisionBody)
        if isinstance(asked, Response):
            return asked
        caller, body = asked
        if body.reason is not None and body.reason not in self.reasons:
            allowed = ", ".join(self.reasons) or "none are configured (IMAGEMILL_REVIEW_REASONS)"
            return _error(422, f"reason must be one of the reason codes: {allowed}")
        reviewer = caller.reviewer
        try:
            stored = await run_in_threadpool(
                self.store.decide,
                reviewer,
                body.uri,
                body.etag or "",
                body.decision,
                body.note,
                body.reason,
                body.override,
            )
        except NotFound as exc:
            return _error(404, str(exc))
        except NotLead as exc:
            return _error(403, str(exc))
        except HeldByAnother:
            return _error(409, "another reviewer holds this item; it returns to the queue when their lease ends")
        except Conflict as exc:
            return JSONResponse(
                {
                    "error": f"{exc.standing.reviewer} decided this item already ({exc.standing.decision});"
                    " only a lead may override it",
                    "decision": exc.standing.as_dict(),
                },
                status_code=409,
            )
        self.metrics.decisions.labels(reviewer.name, str(body.decision)).inc()
        log.info(
            "decision",
            extra={
                "reviewer": reviewer.name,
                "decision": str(body.decision),
                "uri": body.uri,
                "override": stored.override,
            },
        )
        if self.tagger is not None and not stored.second_look:
            await run_in_threadpool(self.tagger.tag, body.uri, OUTCOME[body.decision])
        return JSONResponse(stored.as_dict())

    async def api_undo(self, request: Request) -> Response:
        caller, refused = await self._caller(request, write=True)
        if refused is not None or caller is None:
            return refused or _unauthorized()
        reviewer = caller.reviewer
        try:
            undone, item = await run_in_threadpool(self.store.undo, reviewer)
        except NotFound as exc:
            return _error(404, str(exc))
        self.metrics.decisions.labels(reviewer.name, "undo").inc()
        log.info("undo", extra={"reviewer": reviewer.name, "decision": undone.decision, "uri": undone.uri})
        if self.tagger is not None and not undone.second_look:
            await run_in_threadpool(self.tagger.tag, undone.uri, None)
        return JSONResponse({"undone": undone.as_dict(), "item": item_json(item) if item else None})

    async def api_renew(self, request: Request) -> Response:
        asked = await self._write_with_body(request, ClaimsBody)
        if isinstance(asked, Response):
            return asked
        caller, body = asked
        keys = [(key.uri, key.etag) for key in body.items]
        renewed = await run_in_threadpool(self.store.renew, caller.reviewer.name, keys)
        return JSONResponse(
            {
                "lease_s": self.store.lease_s,
                "renewed": [
                    {"uri": uri, "etag": etag, "claimed_until": until.isoformat()}
                    for (uri, etag), until in renewed.renewed.items()
                ],
                "lost": [{"uri": uri, "etag": etag} for uri, etag in renewed.lost],
            }
        )

    async def api_release(self, request: Request) -> Response:
        asked = await self._write_with_body(request, ClaimsBody)
        if isinstance(asked, Response):
            return asked
        caller, body = asked
        if not body.all and not body.items:
            return _error(422, 'name the items to release, or send {"all": true}')
        keys = None if body.all else [(key.uri, key.etag) for key in body.items]
        released = await run_in_threadpool(self.store.release, caller.reviewer.name, keys)
        return JSONResponse({"released": released})

    async def api_stats(self, request: Request) -> Response:
        caller, refused = await self._caller(request, write=False)
        if refused is not None or caller is None:
            return refused or _unauthorized()
        stats = await run_in_threadpool(self._stats)
        return JSONResponse(
            {
                "reviewers": [row.__dict__ for row in stats["reviewers"]],
                "agreement": [
                    {"first": row.first, "pairs": row.pairs, "agreed": row.agreed, "rate": row.rate}
                    for row in stats["agreement"]
                ],
                "counts": stats["counts"].as_dict(),
            }
        )

    async def thumbnail(self, request: Request) -> Response:
        return await self._picture(request, self.thumbnails, "private, max-age=86400")

    async def image(self, request: Request) -> Response:
        # the full-size view: large, so not kept by the browser for long
        return await self._picture(request, self.full_size, "private, max-age=600")

    async def _picture(self, request: Request, maker: Thumbnails, cache: str) -> Response:
        caller, refused = await self._caller(request, write=False)
        if refused is not None or caller is None:
            return refused or _unauthorized()
        uri = request.query_params.get("uri", "")
        etag = request.query_params.get("etag", "")
        not_found = _error(404, "no record of that image")
        if not safe_uri(uri) or len(uri) > 4096 or len(etag) > 256:
            return not_found
        if not await run_in_threadpool(self.store.has_record, uri, etag):
            return not_found
        tag = '"' + quote(f"{uri}\x00{etag}", safe="")[-64:] + '"'
        if request.headers.get("if-none-match") == tag:
            return Response(status_code=304, headers={"ETag": tag})
        started = time.perf_counter()
        try:
            data = await run_in_threadpool(maker.get, uri, etag)
        except ImageError as exc:
            log.warning("thumbnail of %s failed: %s", uri, exc.message)
            return _error(404, "the image cannot be read")
        self.metrics.thumbnail_seconds.observe(time.perf_counter() - started)
        # private: the image is only for reviewers; a new etag is a new URL, so it may be kept
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": cache, "ETag": tag})

    # -- operations -------------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        try:
            await run_in_threadpool(self.store.ping)
        except DATABASE_DOWN:
            return JSONResponse({"status": "database unreachable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics_endpoint(self, request: Request) -> Response:
        if not self.auth.may_read_metrics(request.headers.get("authorization")):
            return _unauthorized()
        data = await run_in_threadpool(generate_latest, self.metrics.registry)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    def routes(self) -> list[Route | Mount]:
        return [
            Route("/", self.queue_page, methods=["GET"]),
            Route("/stats", self.stats_page, methods=["GET"]),
            Route("/login", self.login_page, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/api/queue", self.api_queue, methods=["GET"]),
            Route("/api/counts", self.api_counts, methods=["GET"]),
            Route("/api/stats", self.api_stats, methods=["GET"]),
            Route("/api/decisions", self.api_decide, methods=["POST"]),
            Route("/api/undo", self.api_undo, methods=["POST"]),
            Route("/api/claims/renew", self.api_renew, methods=["POST"]),
            Route("/api/claims/release", self.api_release, methods=["POST"]),
            Route("/api/thumbnail", self.thumbnail, methods=["GET"]),
            Route("/api/image", self.image, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/metrics", self.metrics_endpoint, methods=["GET"]),
            Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
        ]


def _form(body: bytes) -> dict[str, str]:
    try:
        return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=20))
    except (UnicodeDecodeError, ValueError):
        return {}


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if request.url.path.startswith("/api/"):
        return _error(exc.status_code, str(exc.detail))
    return PlainTextResponse(str(exc.detail), status_code=exc.status_code)


async def _database_down(request: Request, exc: Exception) -> Response:
    log.warning("the database is unreachable: %s", " ".join(str(exc).split())[:300])
    message = "the database is unreachable; try again shortly"
    if request.url.path.startswith("/api/"):
        return _error(503, message, **{"Retry-After": "5"})
    return PlainTextResponse(message, status_code=503, headers={"Retry-After": "5"})


def create_app(review: ReviewApp, background: bool = True) -> Starlette:
    """The ASGI app: the store's connections are closed when it shuts down. With `background`, a
    thread applies the auto-reject bands and recounts the queue every `counts_refresh_s`."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        worker = Background(review) if background else None
        if worker is not None:
            worker.start()
        yield
        if worker is not None:
            worker.stop()
        review.store.close()
        if review.tagger is not None:
            review.tagger.close()

    handlers: dict[Any, Any] = {HTTPException: _http_error}
    handlers.update(dict.fromkeys(DATABASE_DOWN, _database_down))
    app = Starlette(routes=review.routes(), lifespan=lifespan, exception_handlers=handlers)
    app.add_middleware(SecurityHeaders)
    if review.forwarded_allow_ips:
        # X-Forwarded-Proto/-For from the proxies named there (the scheme makes cookies Secure)
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=review.forwarded_allow_ips)
    app.add_middleware(PeerAddress)  # outermost: sees the socket's address before anything rewrites it
    return app


class Background:
    """A thread that sweeps the auto-reject bands, recounts the queue and forgets ended sessions and
    old failed logins, until stopped. A database that is away is logged and tried again next time."""

    def __init__(self, review: ReviewApp) -> None:
        self._review = review
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="review-background", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        every = self._review.counts_refresh_s
        while not self._stop.wait(every):
            try:
                if self._review.store.bands.auto_reject:
                    self._review.store.sweep()
                self._review.store.recount(older_than_s=every * 0.9)
                self._review.auth.sessions.purge()
                self._review.limits.purge()
            except DATABASE_DOWN as exc:
                log.warning("recounting the queue failed: %s", " ".join(str(exc).split())[:300])
