"""``python -m benchmarks [options]``: the same as ``fourdstream bench`` (see benchmarks/README.md)."""

from fourdstream.cli import main

main(["bench", *__import__("sys").argv[1:]])
