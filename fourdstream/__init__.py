"""fourdstream: stream NCEM 4D Camera data into MPI ranks and count electrons."""

__version__ = "0.1.0"
