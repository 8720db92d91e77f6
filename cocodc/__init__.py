"""cocodc: pretrain language models across regions joined by a slow wide-area link."""

from cocodc.comm import CommEngine
from cocodc.config import Config, ConfigError, SyncConfig, load_config
from cocodc.model import Transformer
from cocodc.region_state import RegionState
from cocodc.sync import OuterSync

__version__ = "0.1.0"

__all__ = [
    "CommEngine",
    "Config",
    "ConfigError",
    "OuterSync",
    "RegionState",
    "SyncConfig",
    "Transformer",
    "load_config",
]
