"""Work from stored records, no image annotated: retag from embeddings, exports for training,
near-duplicate groups, and the `--where` filters they share.

Beside the producer and the worker: it reads what they wrote and scores with the models' own code.
"""
