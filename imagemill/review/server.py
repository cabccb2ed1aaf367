"""`imagemill review`: the app built from the settings and served by uvicorn.

Refuses to start (UserError, one line) without reviewers' tokens or a reachable database.
"""

import logging

import uvicorn

from imagemill.core import logs
from imagemill.core.settings import Settings
from imagemill.review.app import ReviewApp, create_app
from imagemill.review.auth import Authenticator
from imagemill.review.settings import SHORT_TOKEN, ReviewSettings, load_tokens, session_secret
from imagemill.review.store import ReviewStore
from imagemill.review.tags import ReviewTagger
from imagemill.review.thumbnails import Thumbnails

log = logging.getLogger("imagemill.review")


def build(sink: str, settings: Settings, review: ReviewSettings, write_tags: bool = False) -> ReviewApp:
    """Everything the app needs, checked: tokens first (no database is touched without them)."""
    tokens = load_tokens(review.tokens)
    store = ReviewStore(sink, audit_rate=review.audit_rate, lease_s=review.lease_s)
    store.setup()
    short = sorted(name for name, token in tokens.items() if len(token) < SHORT_TOKEN)
    if short:
        log.warning("tokens shorter than %d characters (guessable): %s", SHORT_TOKEN, ", ".join(short))
    auth = Authenticator(tokens, session_secret(review, tokens), int(review.session_hours * 3600), review.metrics_token)
    return ReviewApp(
        store,
        auth,
        Thumbnails(settings, review.thumbnail_cache),
        page_size=review.page_size,
        blur=review.blur,
        max_body_bytes=review.max_body_bytes,
        tagger=ReviewTagger(settings) if write_tags or review.write_tags else None,
    )


def serve(app: ReviewApp, host: str, port: int, settings: Settings, review: ReviewSettings) -> None:
    """Run until SIGINT/SIGTERM; logs (access log included) in the workers' format."""
    logs.configure(settings.log_format, logging.INFO)
    log.info("review app on http://%s:%d over table %s", host, port, app.store.table)
    config = uvicorn.Config(
        create_app(app),
        host=host,
        port=port,
        log_config=None,  # uvicorn's loggers propagate to the root handler configured above
        proxy_headers=review.forwarded_allow_ips is not None,
        forwarded_allow_ips=review.forwarded_allow_ips,
        server_header=False,
    )
    uvicorn.Server(config).run()
