"""Preparing images for the models: fetch on threads, decode, preprocess, and stage on the device.

`prefetch` runs the fetch ▸ decode ▸ preprocess window ahead of the models; `staging` and `device_decode` the GPU path.
"""
