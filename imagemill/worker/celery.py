"""The Celery app of the worker service: `celery -A imagemill.worker worker -Q imagemill` finds `app` here.

Configured from IMAGEMILL_* settings (`imagemill.core.broker`); the chunk task lives in `imagemill.worker.tasks`,
the log-format, log-context and metrics signal handlers in `imagemill.worker.signals`, how SIGTERM stops it in
`imagemill.worker.shutdown`.
"""

import imagemill.worker.shutdown  # SIGTERM: warm at once, cold after the soft-shutdown timeout
import imagemill.worker.signals  # noqa: F401  connected before Celery sets up logging
from imagemill.core.broker import make_celery
from imagemill.core.settings import get_settings

app = make_celery(get_settings())
app.conf.include = ["imagemill.worker.tasks", "imagemill.worker.signals"]
