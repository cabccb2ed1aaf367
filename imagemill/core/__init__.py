"""The core layer: settings, schemas, error kinds, object storage, results stores, job registry, broker.

Everything above imports from here; nothing here imports from the layers above.
"""
