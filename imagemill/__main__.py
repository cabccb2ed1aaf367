"""`python -m imagemill` runs the CLI."""

from imagemill.cli import app

app()
