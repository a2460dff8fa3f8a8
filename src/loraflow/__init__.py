"""loraflow: LoRA fine-tuning of causal LMs as an MLflow Project, with a lossless MLflow flavor.

The names below are imported on first use (PEP 562), so `import loraflow.flavor` (what
`mlflow.pyfunc.load_model` does) loads only the flavor's own modules. A saved model ships its
loading code without this file (`loraflow.flavor.save.SHIPPED`): where loraflow is installed, this
package is the one imported, whatever a model put on `sys.path`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# peft imports bitsandbytes whenever it is installed; two of its log lines that nobody can act on are
# filtered before that can happen (logging filters only: bitsandbytes itself is not imported here).
from loraflow.flavor.quantization import quiet_bitsandbytes

quiet_bitsandbytes()

if TYPE_CHECKING:
    from loraflow.config import LoraSettings, TrainSettings, lora_settings, parse_settings
    from loraflow.errors import ConfigError, DataError, LoraflowError
    from loraflow.compat import LoRAManager

_EXPORTS = {
    "ConfigError": "loraflow.errors",
    "DataError": "loraflow.errors",
    "LoraflowError": "loraflow.errors",
    "LoRAManager": "loraflow.compat",
    "LoraSettings": "loraflow.config",
    "TrainSettings": "loraflow.config",
    "lora_settings": "loraflow.config",
    "parse_settings": "loraflow.config",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'loraflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
