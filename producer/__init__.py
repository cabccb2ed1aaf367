"""The producer service: finds images in a source and turns them into work.

Listing (sources), filtering and, in distributed mode, chunking and enqueueing live here.
"""
