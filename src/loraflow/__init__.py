"""loraflow: LoRA fine-tuning of causal LMs as an MLflow Project, with a lossless MLflow flavor."""

from loraflow.config import LoraSettings, TrainSettings, lora_settings, parse_settings
from loraflow.errors import ConfigError, DataError, LoraflowError
from loraflow.manager import LoRAManager

__all__ = [
    "ConfigError",
    "DataError",
    "LoRAManager",
    "LoraSettings",
    "LoraflowError",
    "TrainSettings",
    "lora_settings",
    "parse_settings",
]
__version__ = "0.1.0"
