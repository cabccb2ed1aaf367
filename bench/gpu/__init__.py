"""GPU check: one script for the first device lent (`bash bench/gpu/check.sh`)."""
