"""Scale probes, one command each (`python -m bench.scale.<probe>`): one job of imagemill at a large
size (a million records, objects or rows), its time, memory and correctness, with a report each."""
