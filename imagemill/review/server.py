"""`imagemill review`: the app built from the settings and served by uvicorn.

Refuses to start (UserError, one line) without reviewers (tokens, or proxy mode's proxies), with
tokens shorter than 16 characters, with bands that contradict the thresholds, or without a database.
"""

import logging

import uvicorn

from imagemill.core import logs
from imagemill.core.settings import Settings
from imagemill.review.app import ReviewApp, create_app
from imagemill.review.auth import Authenticator, ProxyAuth
from imagemill.review.sessions import LoginLimits, Sessions, app_key
from imagemill.review.settings import ReviewSettings, check_bands, load_tokens
from imagemill.review.store import Bands, ReviewStore
from imagemill.review.tags import ReviewTagger
from imagemill.review.thumbnails import FULL_SIDE, Thumbnails

log = logging.getLogger("imagemill.review")


def build(sink: str, settings: Settings, review: ReviewSettings, write_tags: bool = False) -> ReviewApp:
    """Everything the app needs, checked: tokens and bands first (no database is touched without
    them); then the tables, the sessions of changed tokens revoked, and a first count of the queue."""
    proxy_mode = review.auth == "proxy"
    tokens = load_tokens(review.tokens, required=not proxy_mode)
    check_bands(review, settings.moderation_thresholds)
    bands = Bands(
        thresholds=settings.moderation_thresholds,
        auto_reject=review.auto_reject,
        audit_rate=review.audit_rate,
        auto_audit_rate=review.auto_audit_rate,
        second_look_rate=review.second_look_rate,
    )
    store = ReviewStore(sink, bands, lease_s=review.lease_s)
    store.setup()
    sessions = Sessions(store.pool, review.session_hours * 3600, review.session_idle_minutes * 60)
    limits = LoginLimits(
        store.pool, review.login_window_s, review.login_failures_per_address, review.login_failures_per_reviewer
    )
    with store.pool.connection() as conn, conn.transaction():
        sessions.setup(conn)
        limits.setup(conn)
    key = review.session_secret.encode() if review.session_secret else app_key(store.pool)
    proxy = (
        ProxyAuth(
            review.proxy_header,
            review.proxy_addresses,
            tokens,
            review.proxy_role_header,
            review.proxy_lead_groups,
            review.proxy_logout_url,
        )
        if proxy_mode
        else None
    )
    auth = Authenticator(tokens, sessions, key, review.metrics_token, proxy)
    revoked = sessions.revoke_changed(auth.fingerprints())
    if revoked:
        log.info("ended %d sessions of reviewers whose token changed or who are gone", revoked)
    if bands.auto_reject:
        store.sweep()
    store.recount(older_than_s=review.counts_refresh_s)  # another replica's recent count will do
    return ReviewApp(
        store,
        auth,
        limits,
        Thumbnails(settings, review.thumbnail_cache),
        Thumbnails(settings, 8, FULL_SIDE),
        page_size=review.page_size,
        blur=review.blur,
        reveal_before_deciding=review.reveal_before_deciding,
        reasons=review.reasons,
        page_idle_s=review.page_idle_s,
        counts_refresh_s=review.counts_refresh_s,
        max_body_bytes=review.max_body_bytes,
        forwarded_allow_ips=review.forwarded_allow_ips,
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
        # the app reads X-Forwarded-Proto/-For itself (create_app), after noting the socket's peer for proxy mode
        proxy_headers=False,
        server_header=False,
    )
    uvicorn.Server(config).run()
