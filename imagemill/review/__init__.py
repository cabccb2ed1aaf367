"""The review queue: a web app where a moderation team decides on flagged images, over the PostgreSQL store.

`settings` (IMAGEMILL_REVIEW_*, reviewers' tokens and roles), `store` (the queue, claims, decisions
and counts in PostgreSQL), `sessions` (sessions and login limits in PostgreSQL), `db` (connections),
`tags` (decisions written back as S3 object tags), `thumbnails`, `auth` (tokens, sessions, the
trusted proxy) and `app` (the ASGI app: pages, API, metrics). Only `app` and `server` need the
`review` extra (Starlette, Jinja2, uvicorn).
"""
