"""`LoRAManager`: the seed design's static-method contract, as a thin facade over `loraflow.lora`.

Code written against the original system (`LoRAManager.apply_lora(model, lora_config)` then
`LoRAManager.verify_trainable_parameters(model)`) keeps working unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class LoRAManager:
    """Apply LoRA from a plain dict and verify that only LoRA (and projector) weights train."""

    @staticmethod
    def apply_lora(model: Any, lora_config: Mapping[str, Any]) -> Any:
        """Apply LoRA adapters described by `lora_config` and return the `PeftModel`.

        Args:
            model: a pre-trained transformers model.
            lora_config: `r`, `lora_alpha`, `target_modules`, `lora_dropout`, and optionally
                `task_type` (default CAUSAL_LM), `inference_mode` (default False) and any other
                `loraflow.LoraSettings` field.

        Raises:
            ImportError: peft is not installed.
            ValueError: the config is invalid (a `loraflow.ConfigError` listing every problem).
            RuntimeError: peft failed to apply the adapters.
        """
        try:
            import peft  # noqa: F401
        except ImportError as err:
            raise ImportError("LoRAManager.apply_lora needs peft: pip install peft") from err
        from loraflow.lora import apply_lora

        # The seed's callers passed their whole `lora` section, including its on/off switch.
        settings = {k: v for k, v in dict(lora_config).items() if k != "enabled"}
        return apply_lora(model, settings)

    @staticmethod
    def verify_trainable_parameters(model: Any) -> dict[str, float | int]:
        """Count parameters and check that only LoRA and projector parameters are trainable.

        Returns:
            total_params, trainable_params, frozen_params, lora_params, projector_params,
            other_trainable_params and trainable_percentage.

        Raises:
            loraflow.lora.TrainabilityError (a RuntimeError): other parameters are trainable.
        """
        from loraflow.lora import parameter_report
        from loraflow import tracking

        report = parameter_report(model)
        tracking.log_metrics_safely(report)
        return report
