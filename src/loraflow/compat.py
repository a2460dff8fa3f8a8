"""`LoRAManager`: the seed design's facade, kept for code written against it.

The original system's contract (`LoRAManager.apply_lora(model, lora_config)` then
`LoRAManager.verify_trainable_parameters(model)`, both logging to the active MLflow run) keeps
working unchanged, as thin static methods over `loraflow.lora` and `loraflow.tracking`. New code
calls those two modules directly.
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
        from loraflow import tracking
        from loraflow.config import lora_settings
        from loraflow.lora import apply_lora, parameter_report

        # The seed's callers passed their whole `lora` section, including its on/off switch.
        settings = lora_settings({k: v for k, v in dict(lora_config).items() if k != "enabled"})
        peft_model = apply_lora(model, settings)
        tracking.log_lora(settings, parameter_report(peft_model))  # the seed logged to the active run
        return peft_model

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
