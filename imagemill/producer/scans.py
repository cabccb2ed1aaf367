"""A scheduled scan: one incremental submit of a source, fired by Celery beat.

Only new or changed objects are enqueued; a scan whose previous job still runs attaches to it.
"""

import logging
from typing import Any

from imagemill.core.jobs import JobRegistry
from imagemill.core.lanes import DEFAULT_LANE, Lane
from imagemill.core.settings import get_settings
from imagemill.core.tasks import parse_tasks
from imagemill.pipeline.sources import open_source
from imagemill.producer.celery import SCAN_TASK, app
from imagemill.producer.submit import Submission

log = logging.getLogger(__name__)


@app.task(name=SCAN_TASK, ignore_result=True, acks_late=True)
def scan(schedule: str, source: str, tasks: str, sink: str, lane: str = DEFAULT_LANE.value) -> dict[str, Any]:
    """Submit `source` again into the schedule's `lane` (a schedule stored before the lanes has none:
    the default); returns the job it enqueued into (or attached to) and how many chunks."""
    settings = get_settings()
    listed = open_source(source, settings)
    with (
        JobRegistry(settings.registry_url) as registry,
        Submission(listed, parse_tasks(tasks), sink, settings, registry, lane=Lane(lane)) as submission,
    ):
        job, created = submission.register()
        chunks = submission.run()
    log.info("schedule %s: job %s (%s), %d chunks enqueued", schedule, job.id, "new" if created else "attached", chunks)
    return {"schedule": schedule, "job_id": job.id, "chunks": chunks}
