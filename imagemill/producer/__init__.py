"""The producer service: submissions (register, list, skip, chunk, enqueue under backpressure),
and Celery beat firing scheduled scans. `celery -A imagemill.producer` finds its app.
"""
