"""Typed, validated configuration (one schema for every section)."""

from megaxatl.config.load import ConfigError, config_from_dict, config_to_dict, load_config
from megaxatl.config.schema import (
    Config,
    DataConfig,
    FreezeConfig,
    LoggingConfig,
    Mamba2Config,
    MambaConfig,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
    TransferConfig,
)

__all__ = [
    "Config", "ConfigError", "DataConfig", "FreezeConfig", "LoggingConfig", "Mamba2Config",
    "MambaConfig", "ModelConfig", "ParallelConfig", "TrainConfig", "TransferConfig",
    "config_from_dict", "config_to_dict", "load_config",
]
