"""The worker service: the annotation engine and, in distributed mode, the Celery app around it.

fetch ▸ decode ▸ batch ▸ models, written once; local mode calls the engine directly.
"""
