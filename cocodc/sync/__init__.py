"""The outer-sync module: fragments, schedule, merge rules and OuterSync. Plain tensor code that
talks to the network only through `cocodc.comm`."""

from cocodc.sync.outer import OuterSync

__all__ = ["OuterSync"]
