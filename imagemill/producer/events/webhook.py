"""The HTTP receiver: S3 servers that POST their event JSON (MinIO, Ceph RGW, SeaweedFS, Garage)
to `http://HOST:PORT/`, with the shared secret as a Bearer token or a `?token=` query.

A request is answered 200 only once its events are enqueued (the server retries anything else);
a wrong or missing secret is 401, a body that is not S3 event JSON 400.
"""

import asyncio
import hmac
import logging
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from imagemill.core.errors import UserError
from imagemill.producer.events.s3_events import ObjectEvent, parse

log = logging.getLogger(__name__)

# an S3 event message is at most 64 KB; a server that batches sends a few
MAX_BODY_BYTES = 1024 * 1024

Submit = Callable[[list[ObjectEvent]], "Future[Any]"]


def address(source: str) -> tuple[str, int]:
    """`http://HOST:PORT` -> (HOST, PORT); UserError for anything else."""
    parts = urlsplit(source)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "http" or not parts.hostname or port is None or parts.path not in ("", "/"):
        raise UserError(f"source {source}: expected http://HOST:PORT (the address to listen on)")
    return parts.hostname, port


def authorized(request: Request, secret: str) -> bool:
    """Whether the request carries the secret, as `Authorization: Bearer …` or `?token=…`, compared
    in constant time."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    given = credentials.strip() if scheme.lower() == "bearer" else request.query_params.get("token", "")
    return bool(given) and hmac.compare_digest(given.encode(), secret.encode())


def webhook_app(submit: Submit, secret: str) -> Starlette:
    """The receiver's app: POST any path with events, GET /healthz for probes."""

    async def receive(request: Request) -> Response:
        if not authorized(request, secret):
            return PlainTextResponse("unauthorized\n", status_code=401, headers={"WWW-Authenticate": "Bearer"})
        body = b""
        async for part in request.stream():
            body += part
            if len(body) > MAX_BODY_BYTES:
                return PlainTextResponse("body too large\n", status_code=413)
        try:
            parsed = parse(body)
        except ValueError as exc:
            log.warning("refused a webhook body: %s", exc)
            return PlainTextResponse(f"{exc}\n", status_code=400)
        try:
            await asyncio.wrap_future(submit(parsed.events))
        except Exception as exc:  # noqa: BLE001 - the server delivers again; the watcher goes on
            log.warning("could not enqueue %d events: %s", len(parsed.events), exc)
            return PlainTextResponse("not enqueued; deliver again\n", status_code=503)
        return JSONResponse({"events": len(parsed.events), "ignored": parsed.ignored})

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    return Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/{path:path}", receive, methods=["POST"]),
        ]
    )
