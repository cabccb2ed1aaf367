"""The producer's Celery app, built from the IMAGEMILL_* settings when this module is imported:
`celery -A imagemill.producer worker --beat` finds `app` here (see `imagemill.producer.beat`).
"""

from imagemill.core.settings import settings_or_exit
from imagemill.producer.beat import SCAN_TASK, make_producer_app

__all__ = ["SCAN_TASK", "app", "make_producer_app"]

app = make_producer_app(settings_or_exit())
