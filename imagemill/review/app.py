"""The review app: server-rendered pages, a JSON API, thumbnails, health and metrics (Starlette).

Every route but `/healthz`, `/login` and `/static/*` needs a reviewer: the API a Bearer token or the
page's session cookie (writes from the page also carry its CSRF token in `X-CSRF-Token`); without
one, the API answers 401 and pages redirect to the login form. Database and S3 calls are blocking,
so each runs on Starlette's thread pool.
"""

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, quote, urlencode

import psycopg
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

from imagemill.core.errors import ImageError
from imagemill.review.auth import CSRF_HEADER, LOGIN_COOKIE, SESSION_COOKIE, Authenticator, Session, csrf_ok
from imagemill.review.store import OUTCOME, Claimed, Decision, Filters, HeldByAnother, Item, NotFound, ReviewStore
from imagemill.review.tags import ReviewTagger
from imagemill.review.thumbnails import Thumbnails, safe_uri

log = logging.getLogger("imagemill.review")

HERE = Path(__file__).parent
MAX_LIMIT = 200
MAX_NOTE = 2000
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


@dataclass
class Metrics:
    registry: CollectorRegistry
    decisions: Counter
    expiries: Counter
    thumbnail_seconds: Histogram


class _QueueSize(Collector):
    def __init__(self, store: ReviewStore) -> None:
        self._store = store

    def collect(self) -> list[Metric]:
        gauge = GaugeMetricFamily("imagemill_review_queue_size", "Items left to decide (flagged and audit sample)")
        try:
            gauge.add_metric([], self._store.queue_size())
        except psycopg.Error:
            return []  # the database is away: no sample rather than a wrong one
        return [gauge]


def _metrics(store: ReviewStore) -> Metrics:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_QueueSize(store))
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


def _filters(request: Request) -> Filters:
    """Filters from the query string; HTTPException 422 on a bad number."""
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
    if (job and len(job) > 256) or (label and len(label) > 256):
        raise HTTPException(422, "job and label are at most 256 characters")
    return Filters(job_id=job, label=label, min_score=number("min"), max_score=number("max"))


def thumbnail_url(item: Item) -> str:
    return "/api/thumbnail?" + urlencode({"uri": item.uri, "etag": item.etag}, quote_via=quote)


def item_json(item: Item) -> dict[str, Any]:
    return {
        "uri": item.uri,
        "etag": item.etag,
        "job_id": item.job_id,
        "scores": item.scores,
        "flagged": item.flagged,
        "caption": item.caption,
        "tags": item.tags,
        "reason": item.reason,
        "thumbnail_url": thumbnail_url(item),
        "claimed_until": item.claimed_until.isoformat() if item.claimed_until else None,
    }


def _safe_next(target: str | None) -> str:
    # only a path on this site: never `//host` or `https://host` (an open redirect)
    if target and target.startswith("/") and not target.startswith(("//", "/\\")):
        return target
    return "/"


class ReviewApp:
    """The routes and what they share: the store, the authenticator, thumbnails, metrics."""

    def __init__(
        self,
        store: ReviewStore,
        auth: Authenticator,
        thumbnails: Thumbnails,
        *,
        page_size: int = 24,
        blur: bool = True,
        max_body_bytes: int = 16_384,
        tagger: ReviewTagger | None = None,
    ) -> None:
        self.store = store
        self.auth = auth
        self.thumbnails = thumbnails
        self.page_size = page_size
        self.blur = blur
        self.max_body_bytes = max_body_bytes
        self.tagger = tagger
        self.metrics = _metrics(store)
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))

    # -- who is asking ----------------------------------------------------------------------------

    def _session(self, request: Request) -> Session | None:
        return self.auth.session(request.cookies.get(SESSION_COOKIE))

    def _api_reviewer(self, request: Request, write: bool) -> tuple[str | None, Response | None]:
        """The reviewer, or the response to send instead: 401 without credentials, 403 when a
        page write lacks its CSRF token."""
        authorization = request.headers.get("authorization")
        if authorization:
            reviewer = self.auth.bearer(authorization)
            return (reviewer, None) if reviewer else (None, _unauthorized())
        session = self._session(request)
        if session is None:
            return None, _unauthorized()
        if write and not csrf_ok(session, request.headers.get(CSRF_HEADER)):
            return None, _error(403, "missing or wrong CSRF token (X-CSRF-Token)")
        return session.reviewer, None

    def _secure(self, request: Request) -> bool:
        # uvicorn sets the scheme from X-Forwarded-Proto only for the proxies it was told to trust
        return request.url.scheme == "https"

    # -- pages ------------------------------------------------------------------------------------

    async def login_page(self, request: Request) -> Response:
        return self._login_form(request, None, 200)

    def _login_form(self, request: Request, message: str | None, status: int) -> Response:
        nonce, cookie = self.auth.login_nonce()
        response = self.templates.TemplateResponse(
            request,
            "login.html",
            {"nonce": nonce, "next": _safe_next(request.query_params.get("next")), "message": message},
            status_code=status,
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
        try:
            form = _form(await read_body(request, self.max_body_bytes))
        except BodyTooLarge:
            return PlainTextResponse("request body too large", status_code=413)
        if not self.auth.login_nonce_ok(request.cookies.get(LOGIN_COOKIE), form.get("nonce", "")):
            return self._login_form(request, "The login form expired; try again.", 400)
        reviewer = self.auth.reviewer_for(form.get("token", ""))
        if reviewer is None:
            log.warning("login refused", extra={"client": request.client.host if request.client else None})
            return self._login_form(request, "That token is not a reviewer's.", 401)
        value, _ = self.auth.new_session(reviewer)
        log.info("login", extra={"reviewer": reviewer})
        response = RedirectResponse(_safe_next(form.get("next")), status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            value,
            max_age=self.auth.session_s,
            httponly=True,
            samesite="strict",
            secure=self._secure(request),
        )
        response.delete_cookie(LOGIN_COOKIE, path="/login")
        return response

    async def logout(self, request: Request) -> Response:
        session = self._session(request)
        try:
            form = _form(await read_body(request, self.max_body_bytes))
        except BodyTooLarge:
            return PlainTextResponse("request body too large", status_code=413)
        if session is not None and not csrf_ok(session, form.get("csrf")):
            return PlainTextResponse("missing or wrong CSRF token", status_code=403)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, httponly=True, samesite="strict", secure=self._secure(request))
        return response

    async def queue_page(self, request: Request) -> Response:
        session = self._session(request)
        if session is None:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse("/login?" + urlencode({"next": target}), status_code=303)
        try:
            filters = _filters(request)
        except HTTPException as exc:
            return PlainTextResponse(str(exc.detail), status_code=422)
        after = request.query_params.get("after", "")
        claimed = await self._claim(session.reviewer, self.page_size, filters, after)
        counts = await run_in_threadpool(self.store.counts, session.reviewer, filters)
        query = {k: v for k, v in request.query_params.items() if k != "after" and v}
        next_url = "/?" + urlencode({**query, "after": claimed.next_after}) if claimed.next_after else None
        return self.templates.TemplateResponse(
            request,
            "queue.html",
            {
                "reviewer": session.reviewer,
                "csrf": session.csrf,
                "items": [(item, thumbnail_url(item)) for item in claimed.items],
                "counts": counts,
                "filters": filters,
                "blur": self.blur,
                "next_url": next_url,
                "lease_s": self.store.lease_s,
            },
        )

    # -- API --------------------------------------------------------------------------------------

    async def _claim(self, reviewer: str, limit: int, filters: Filters, after: str) -> Claimed:
        claimed = await run_in_threadpool(self.store.claim, reviewer, limit, filters, after)
        if claimed.expired:
            self.metrics.expiries.inc(claimed.expired)
        return claimed

    async def api_queue(self, request: Request) -> Response:
        reviewer, refused = self._api_reviewer(request, write=False)
        if refused is not None or reviewer is None:
            return refused or _unauthorized()
        text = request.query_params.get("limit", str(self.page_size))
        if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
            return _error(422, f"limit must be a whole number from 1 to {MAX_LIMIT}")
        after = request.query_params.get("after", "")
        if len(after) > 4096:
            return _error(422, "after is at most 4096 characters")
        claimed = await self._claim(reviewer, int(text), _filters(request), after)
        return JSONResponse(
            {
                "reviewer": reviewer,
                "lease_s": self.store.lease_s,
                "items": [item_json(item) for item in claimed.items],
                "next_after": claimed.next_after,
            }
        )

    async def api_counts(self, request: Request) -> Response:
        reviewer, refused = self._api_reviewer(request, write=False)
        if refused is not None or reviewer is None:
            return refused or _unauthorized()
        counts = await run_in_threadpool(self.store.counts, reviewer, _filters(request))
        return JSONResponse({"left": counts.left, "done": counts.done, "mine": counts.mine})

    async def api_decide(self, request: Request) -> Response:
        reviewer, refused = self._api_reviewer(request, write=True)
        if refused is not None or reviewer is None:
            return refused or _unauthorized()
        try:
            raw = await read_body(request, self.max_body_bytes)
        except BodyTooLarge:
            return _error(413, f"request body over {self.max_body_bytes} bytes")
        try:
            parsed = json.loads(raw)
        except ValueError:
            return _error(422, 'the body is not JSON: send {"uri", "etag", "decision", "note"?}')
        try:
            body = DecisionBody.model_validate(parsed)
        except ValidationError as exc:
            return _error(422, _describe(exc))
        etag = body.etag or ""
        try:
            stored = await run_in_threadpool(self.store.decide, reviewer, body.uri, etag, body.decision, body.note)
        except NotFound as exc:
            return _error(404, str(exc))
        except HeldByAnother:
            return _error(409, "another reviewer holds this item; it returns to the queue when their lease ends")
        self.metrics.decisions.labels(reviewer, str(body.decision)).inc()
        log.info("decision", extra={"reviewer": reviewer, "decision": str(body.decision), "uri": body.uri})
        if self.tagger is not None:
            await run_in_threadpool(self.tagger.tag, body.uri, OUTCOME[body.decision])
        return JSONResponse(stored.as_dict())

    async def api_undo(self, request: Request) -> Response:
        reviewer, refused = self._api_reviewer(request, write=True)
        if refused is not None or reviewer is None:
            return refused or _unauthorized()
        try:
            undone, item = await run_in_threadpool(self.store.undo, reviewer)
        except NotFound as exc:
            return _error(404, str(exc))
        self.metrics.decisions.labels(reviewer, "undo").inc()
        log.info("undo", extra={"reviewer": reviewer, "decision": undone.decision, "uri": undone.uri})
        if self.tagger is not None:
            await run_in_threadpool(self.tagger.tag, undone.uri, None)
        return JSONResponse({"undone": undone.as_dict(), "item": item_json(item) if item else None})

    async def thumbnail(self, request: Request) -> Response:
        reviewer, refused = self._api_reviewer(request, write=False)
        if refused is not None or reviewer is None:
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
            data = await run_in_threadpool(self.thumbnails.get, uri, etag)
        except ImageError as exc:
            log.warning("thumbnail of %s failed: %s", uri, exc.message)
            return _error(404, "the image cannot be read")
        self.metrics.thumbnail_seconds.observe(time.perf_counter() - started)
        # private: the image is only for reviewers; a new etag is a new URL, so it may be kept long
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400", "ETag": tag})

    # -- operations -------------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        try:
            await run_in_threadpool(self.store.ping)
        except psycopg.Error:
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
            Route("/login", self.login_page, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/api/queue", self.api_queue, methods=["GET"]),
            Route("/api/counts", self.api_counts, methods=["GET"]),
            Route("/api/decisions", self.api_decide, methods=["POST"]),
            Route("/api/undo", self.api_undo, methods=["POST"]),
            Route("/api/thumbnail", self.thumbnail, methods=["GET"]),
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


def create_app(review: ReviewApp) -> Starlette:
    """The ASGI app; the store's connections are closed when it shuts down."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        review.store.close()
        if review.tagger is not None:
            review.tagger.close()

    app = Starlette(routes=review.routes(), lifespan=lifespan, exception_handlers={HTTPException: _http_error})
    app.add_middleware(SecurityHeaders)
    return app
