"""``python -m bench`` = the ``bench`` command."""

from bench.cli import app

app(prog_name="bench")
