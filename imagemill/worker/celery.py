"""The Celery app of the worker service: `celery -A imagemill.worker worker -Q imagemill` finds `app` here.

Configured from IMAGEMILL_* settings (`imagemill.core.broker`); the chunk task lives in `imagemill.worker.tasks`,
the log-format, log-context and metrics signal handlers in `imagemill.worker.signals`, how SIGTERM stops it in
`imagemill.worker.shutdown`.
"""

from imagemill.core.settings import settings_or_exit

# first, before the modules below read the settings themselves (hence E402): a bad one is one line
# and exit 2, not a traceback from whichever import met it
_settings = settings_or_exit()

import imagemill.worker.shutdown  # noqa: E402  SIGTERM: warm at once, cold after the soft-shutdown timeout
import imagemill.worker.signals  # noqa: E402, F401  connected before Celery sets up logging
from imagemill.core.broker import make_celery  # noqa: E402

app = make_celery(_settings)
app.conf.include = ["imagemill.worker.tasks", "imagemill.worker.signals"]
