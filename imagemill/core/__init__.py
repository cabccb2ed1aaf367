"""The core layer: settings, schemas, error kinds, object storage, sinks, job registry, broker.

Everything above imports from here; nothing here imports from the layers above.
"""
