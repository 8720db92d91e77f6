"""cocodc: pretrain language models across regions joined by a slow wide-area link."""

import importlib
from typing import Any

__version__ = "0.1.0"

# The public API, imported on first use: `cocodc train`'s launcher (and `cocodc netem`) need none
# of it, and it costs seconds of imports per process.
_PUBLIC = {
    "CommEngine": "cocodc.comm",
    "Config": "cocodc.config",
    "ConfigError": "cocodc.config",
    "OuterSync": "cocodc.sync",
    "RegionState": "cocodc.region_state",
    "SyncConfig": "cocodc.config",
    "Transformer": "cocodc.model",
    "load_config": "cocodc.config",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'cocodc' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
