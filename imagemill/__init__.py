"""imagemill: annotate images in bulk with captions, moderation scores and tags.

This package is the shared core: settings, schemas, object storage access and results stores.
"""

__version__ = "0.1.0"
