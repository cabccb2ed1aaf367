"""Latency probes, one command each (`python -m bench.latency.<probe>`): how soon work someone waits
for is done while other work fills the workers, and what it costs that other work."""
