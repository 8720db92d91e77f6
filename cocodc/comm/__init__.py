"""The comm engine: moves tensors over a process group, counts bytes; knows no models."""

from cocodc.comm.engine import CommEngine, CommError, Handle

__all__ = ["CommEngine", "CommError", "Handle"]
