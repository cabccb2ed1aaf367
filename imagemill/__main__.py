"""`python -m imagemill` runs the CLI."""

from imagemill.cli import main

main()
