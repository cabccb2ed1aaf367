"""The review queue: a web app where people decide on flagged images, over the PostgreSQL store.

`settings` (IMAGEMILL_REVIEW_*, reviewers' tokens), `store` (the queue, claims and decisions in
PostgreSQL), `tags` (decisions written back as S3 object tags), `thumbnails`, `auth` and `app` (the
ASGI app: pages, API, metrics). Only `app` needs the `review` extra (Starlette, Jinja2, uvicorn).
"""
