"""loraflow: LoRA fine-tuning of causal LMs as an MLflow Project, with a lossless MLflow flavor.

The names below are imported on first use (PEP 562), so `import loraflow.flavor` (what
`mlflow.pyfunc.load_model` does) loads only the flavor's own modules. This file ships inside every
saved model, beside the `loraflow.flavor` package, so it imports nothing eagerly (only the standard
library's `logging`, for `quiet_bitsandbytes`).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

# A logged model ships only what loading needs (this file and `flavor/`) under its `code/loraflow`,
# which MLflow puts first on `sys.path`. Extending `__path__` lets the rest of the package (training,
# tracking) still import from an installed loraflow in that process, instead of failing as missing.
__path__ = pkgutil.extend_path(__path__, __name__)

# peft imports bitsandbytes whenever it is installed; two of its log lines that nobody can act on are
# filtered before that can happen (logging filters only: bitsandbytes itself is not imported here).
from loraflow.flavor.quantization import quiet_bitsandbytes  # noqa: E402

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
