"""Tests for loraflow.compat: the seed's `LoRAManager` static-method contract, logging included."""

from __future__ import annotations

import logging
import sys

import pytest
from torch import nn

from loraflow import ConfigError, LoRAManager
from loraflow.lora import TrainabilityError, parameter_report

SEED_CONFIG = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.05}
REPORT_KEYS = {
    "total_params", "trainable_params", "frozen_params", "lora_params",
    "projector_params", "other_trainable_params", "trainable_percentage",
}


def test_apply_lora_with_the_seed_config(model):
    from peft import PeftModel, TaskType

    peft_model = LoRAManager.apply_lora(model, SEED_CONFIG)
    assert isinstance(peft_model, PeftModel)
    cfg = peft_model.peft_config["default"]
    assert cfg.r == 8 and cfg.lora_alpha == 16 and cfg.lora_dropout == 0.05
    assert set(cfg.target_modules) == {"q_proj", "v_proj"}
    assert cfg.task_type == TaskType.CAUSAL_LM and cfg.inference_mode is False


def test_apply_lora_accepts_task_type_inference_mode_and_the_enabled_switch(model):
    peft_model = LoRAManager.apply_lora(
        model, {**SEED_CONFIG, "task_type": "CAUSAL_LM", "inference_mode": True, "enabled": True}
    )
    assert peft_model.peft_config["default"].inference_mode is True
    assert not [n for n, p in peft_model.named_parameters() if p.requires_grad]


def test_verify_trainable_parameters_returns_the_report(model):
    peft_model = LoRAManager.apply_lora(model, SEED_CONFIG)
    report = LoRAManager.verify_trainable_parameters(peft_model)
    assert set(report) == REPORT_KEYS
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert (report["trainable_params"], report["total_params"]) == (trainable, total)
    assert report["lora_params"] == trainable == 2 * (8 * 256 + 8 * 192)
    assert report["frozen_params"] == total - trainable
    assert 0 < report["trainable_percentage"] < 100


def test_verify_trainable_parameters_counts_a_projector(model):
    class WithProjector(nn.Module):
        def __init__(self, llm):
            super().__init__()
            self.llm = llm
            self.projector = nn.Linear(64, 128)

    outer = WithProjector(LoRAManager.apply_lora(model, SEED_CONFIG))
    report = LoRAManager.verify_trainable_parameters(outer)
    assert report["projector_params"] == 64 * 128 + 128
    assert report["trainable_params"] == report["lora_params"] + report["projector_params"]


def test_verify_trainable_parameters_rejects_leaks(model):
    peft_model = LoRAManager.apply_lora(model, SEED_CONFIG)
    peft_model.base_model.model.model.layers[1].mlp.up_proj.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"layers\.1\.mlp\.up_proj\.weight") as info:
        LoRAManager.verify_trainable_parameters(peft_model)
    assert isinstance(info.value, TrainabilityError)


def test_verify_logs_metrics_to_an_active_run(model, tracking_uri):
    import mlflow
    from mlflow import MlflowClient

    peft_model = LoRAManager.apply_lora(model, SEED_CONFIG)
    with mlflow.start_run() as run:
        report = LoRAManager.verify_trainable_parameters(peft_model)
    metrics = MlflowClient(tracking_uri).get_run(run.info.run_id).data.metrics
    assert metrics["trainable_params"] == report["trainable_params"]
    assert metrics["lora_params"] == report["lora_params"]


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"r": 0}, "r"),
        ({"lora_alpha": -1}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": ["q_proj", "v_prj"]}, "target_modules"),
        ({"task_type": "CAUSAL"}, "task_type"),
        ({"inference_mode": "sometimes"}, "inference_mode"),
        ({"lora_rank": 8}, "lora_rank"),
    ],
)
def test_invalid_config_is_a_value_error(model, bad, field):
    with pytest.raises(ValueError) as info:
        LoRAManager.apply_lora(model, {**SEED_CONFIG, **bad})
    assert isinstance(info.value, ConfigError)
    assert len(info.value.problems) == 1 and f"`{field}`" in info.value.problems[0]


def test_invalid_config_reports_every_problem(model):
    with pytest.raises(ValueError) as info:
        LoRAManager.apply_lora(model, {"r": -1, "lora_alpha": 0, "target_modules": [], "lora_dropout": 2})
    assert len(info.value.problems) == 4


def test_failed_application_is_a_runtime_error(model, monkeypatch):
    import peft

    def boom(*args, **kwargs):
        raise TypeError("peft exploded")

    monkeypatch.setattr(peft, "get_peft_model", boom)
    with pytest.raises(RuntimeError, match="peft exploded"):
        LoRAManager.apply_lora(model, SEED_CONFIG)


def test_unsupported_module_type_is_a_runtime_error(model):
    with pytest.raises(RuntimeError) as info:
        LoRAManager.apply_lora(model, {**SEED_CONFIG, "target_modules": ["post_attention_layernorm"]})
    assert not isinstance(info.value, ValueError)


def test_missing_peft_is_an_import_error(model, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match="pip install peft"):
        LoRAManager.apply_lora(model, SEED_CONFIG)
    assert not any("lora_A" in n for n, _ in model.named_parameters())


# ---------------------------------------------------------------------------------------------
# MLflow logging: LoRAManager.apply_lora logs to the active run, as the seed did


def test_settings_and_report_are_logged_to_the_active_run(model, tracking_uri):
    import mlflow
    from mlflow import MlflowClient

    with mlflow.start_run() as run:
        peft_model = LoRAManager.apply_lora(model, {"r": 4, "target_modules": "q_proj,v_proj", "use_rslora": "true"})
    report = parameter_report(peft_model)
    data = MlflowClient(tracking_uri).get_run(run.info.run_id).data
    assert data.params["r"] == "4"
    assert data.params["target_modules"] == "q_proj,v_proj"
    assert data.params["use_rslora"] == "True"
    assert data.params["modules_to_save"] == ""
    for key, value in report.items():
        assert data.metrics[key] == pytest.approx(float(value))


def test_nothing_is_logged_without_an_active_run(model, tracking_uri):
    from mlflow import MlflowClient

    LoRAManager.apply_lora(model, {"target_modules": "q_proj"})
    client = MlflowClient(tracking_uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert runs == []


@pytest.mark.parametrize("broken", ["log_params", "log_metrics"])
def test_a_logging_failure_warns_and_never_fails_the_caller(model, tracking_uri, monkeypatch, caplog, broken):
    import mlflow
    from peft import PeftModel

    def refuse(*args, **kwargs):
        raise mlflow.exceptions.MlflowException("store is down")

    monkeypatch.setattr(mlflow, broken, refuse)
    with caplog.at_level(logging.WARNING, logger="loraflow.tracking"), mlflow.start_run():
        peft_model = LoRAManager.apply_lora(model, {"target_modules": "q_proj"})
    assert isinstance(peft_model, PeftModel)
    warnings = [r.getMessage() for r in caplog.records if r.name == "loraflow.tracking"]
    assert len(warnings) == 1 and "store is down" in warnings[0]


def test_pre_logged_param_with_other_text_goes_under_resolved(model, tracking_uri):
    """`mlflow run -P target_modules="q_proj, v_proj"` pre-logs the user's text; we must not fail."""
    import mlflow
    from mlflow import MlflowClient

    with mlflow.start_run() as run:
        mlflow.log_params({"target_modules": "q_proj, v_proj", "r": "8", "lora_alpha": "16"})
        LoRAManager.apply_lora(model, {"target_modules": "q_proj, v_proj", "r": "8", "lora_alpha": "16"})
    params = MlflowClient(tracking_uri).get_run(run.info.run_id).data.params
    assert params["target_modules"] == "q_proj, v_proj"
    assert params["target_modules_resolved"] == "q_proj,v_proj"
    assert params["r"] == "8" and "r_resolved" not in params  # same text: skipped
    assert params["lora_alpha"] == "16" and params["lora_alpha_resolved"] == "16.0"
