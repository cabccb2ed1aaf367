"""The worker service: the Celery app and chunk task around the pipeline, the GPU-pinning supervisor.

`celery -A imagemill.worker worker` finds the app in `imagemill.worker.celery`.
"""
