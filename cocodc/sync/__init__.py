"""The outer-sync module: fragments, their flat buffers, schedule and OuterSync (the merge rules'
arithmetic is `cocodc.kernels`). Plain tensor code that talks to the network only through
`cocodc.comm`."""

from cocodc.sync.outer import OuterSync

__all__ = ["OuterSync"]
