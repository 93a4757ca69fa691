"""``python -m fourdstream``: the command line (what mpiexec/srun start on every rank)."""

from .cli import run

run()
