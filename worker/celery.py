"""The Celery app of the worker service: `celery -A worker worker -Q imagemill` finds `app` here.

Configured from IMAGEMILL_* settings (`imagemill.broker`); the chunk task lives in `worker.tasks`,
the log-format, log-context and metrics signal handlers in `worker.signals`.
"""

import worker.signals  # noqa: F401  connected before Celery sets up logging
from imagemill.broker import make_celery
from imagemill.settings import get_settings

app = make_celery(get_settings())
app.conf.include = ["worker.tasks", "worker.signals"]
