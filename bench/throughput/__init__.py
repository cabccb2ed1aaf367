"""Throughput: `python -m bench` times imagemill against the decode ceiling, a naive loop and the models
alone (scenarios.py), locally and distributed, and its memory; and what each captioner costs per image."""
