"""Tests for loraflow.lora: module-name checks, apply_lora through peft, the isolation report, MLflow logging."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from loraflow import ConfigError
from loraflow.config import lora_settings
from loraflow.lora import (
    TrainabilityError,
    apply_lora,
    check_modules,
    format_report,
    linear_module_names,
    parameter_report,
    unmatched_module_problems,
    validate_settings,
)

LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
REPORT_KEYS = {
    "total_params", "trainable_params", "frozen_params", "lora_params",
    "projector_params", "other_trainable_params", "trainable_percentage",
}


def unique_param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def is_lora(name: str) -> bool:
    return any(m in name for m in ("lora_A", "lora_B", "lora_magnitude_vector", "lora_embedding_"))


def assert_counts_consistent(peft_model, report) -> None:
    assert set(report) == REPORT_KEYS
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert report["total_params"] == total
    assert report["trainable_params"] == trainable
    assert report["total_params"] == report["trainable_params"] + report["frozen_params"]
    lora_trainable = sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad and is_lora(n))
    assert report["trainable_params"] == (
        lora_trainable + report["projector_params"] + report["other_trainable_params"]
    )
    assert report["trainable_percentage"] == pytest.approx(100.0 * trainable / total)


# ---------------------------------------------------------------------------------------------
# Module names against the model


def test_linear_module_names_of_the_tiny_llama(model):
    assert linear_module_names(model) == LINEAR  # lm_head is left out, as peft's all-linear does


def test_partial_typo_is_reported_with_closest_names_and_linear_modules(model):
    problems = unmatched_module_problems(model, ("q_proj", "v_prj"))
    assert len(problems) == 1
    problem = problems[0]
    assert problem.startswith("`target_modules` entry 'v_prj' matches no module of LlamaForCausalLM.")
    assert "Did you mean v_proj" in problem
    assert "Linear modules LoRA can target: " + ", ".join(LINEAR) in problem


def test_peft_alone_silently_ignores_a_partial_typo(model):
    """Why the check exists: peft adapts q_proj and says nothing about v_prj."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(target_modules=["q_proj", "v_prj"]))
    assert any("q_proj.lora_A" in n for n in trainable_names(peft_model))
    with pytest.raises(ConfigError) as info:
        check_modules(model, lora_settings(target_modules=["q_proj", "v_prj"]))
    assert len(info.value.problems) == 1 and "'v_prj'" in info.value.problems[0]


def test_every_unmatched_entry_is_reported_for_both_fields(model):
    with pytest.raises(ConfigError) as info:
        check_modules(model, lora_settings(target_modules="q_prj,k_proj,up_prj", modules_to_save="projectr,lm_head"))
    problems = info.value.problems
    assert len(problems) == 3
    assert "'q_prj'" in problems[0] and "Did you mean q_proj" in problems[0]
    assert "'up_prj'" in problems[1] and "Did you mean up_proj" in problems[1]
    assert problems[2].startswith("`modules_to_save` entry 'projectr'")


def test_matching_follows_peft_suffix_rule(model):
    assert unmatched_module_problems(model, ("self_attn.q_proj", "mlp.up_proj")) == []
    assert unmatched_module_problems(model, ("model.layers.0.self_attn.q_proj",)) == []
    # a substring that is not a dotted suffix matches nothing in peft, so it must be reported
    assert len(unmatched_module_problems(model, ("proj",))) == 1
    assert unmatched_module_problems(model, "all-linear", ("lm_head",)) == []


def test_modules_to_save_check_agrees_with_the_installed_peft(model):
    """An entry is valid exactly when the installed peft copies a module for it: the check asks peft
    (whose rule changed between releases: 0.22 no longer takes "layernorm" for input_layernorm)."""
    from peft import LoraConfig, get_peft_model

    for key in ("layernorm", "input_layernorm", "norm", "lm_head", "layers.0.mlp", "layernorms"):
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(target_modules=["q_proj"], modules_to_save=[key]))
        copied = any(".modules_to_save." in n for n in trainable_names(peft_model))
        problems = unmatched_module_problems(model, ("q_proj",), (key,))
        assert (problems == []) == copied, f"{key!r}: peft copies a module: {copied}; problems: {problems}"
    assert unmatched_module_problems(model, ("q_proj",), ("input_layernorm", "lm_head")) == []
    assert len(unmatched_module_problems(model, ("q_proj",), ("layernorms",))) == 1


def test_check_works_on_a_meta_skeleton(tiny_path):
    from loraflow.base_models import load_skeleton

    skeleton = load_skeleton(tiny_path)
    params = list(skeleton.parameters())
    assert params and all(p.device.type == "meta" for p in params)
    assert linear_module_names(skeleton) == LINEAR
    problems = unmatched_module_problems(skeleton, ("q_proj", "v_prj"))
    assert len(problems) == 1 and "Did you mean v_proj" in problems[0]


def test_validate_settings_reports_value_and_name_problems_together(tiny_path):
    with pytest.raises(ConfigError) as info:
        validate_settings({"base_model": tiny_path, "r": 0, "target_modules": "q_proj,v_prj", "modules_to_save": "projectr"})
    problems = info.value.problems
    assert len(problems) == 3
    assert problems[0].startswith("`r` must be a positive integer")
    assert "'v_prj'" in problems[1] and "'projectr'" in problems[2]


def test_validate_settings_returns_settings_when_valid(tiny_path):
    lora, train = validate_settings({"base_model": tiny_path, "target_modules": "all-linear", "modules_to_save": "lm_head"})
    assert lora.target_modules == "all-linear" and train.model.base_model == tiny_path


def test_validate_settings_reports_an_unreadable_base_model(tmp_path):
    with pytest.raises(ConfigError) as info:
        validate_settings({"base_model": str(tmp_path / "missing"), "lora_dropout": 3})
    assert len(info.value.problems) == 2
    assert "`lora_dropout`" in info.value.problems[0]
    assert info.value.problems[1].startswith("`base_model`") and "could not be read" in info.value.problems[1]


# ---------------------------------------------------------------------------------------------
# apply_lora and the report


def test_apply_lora_wraps_only_the_requested_layers(model):
    from peft import PeftModel

    peft_model = apply_lora(model, {"r": 4, "lora_alpha": 8, "target_modules": "q_proj,v_proj"})
    assert isinstance(peft_model, PeftModel)
    names = trainable_names(peft_model)
    assert names and all(is_lora(n) for n in names)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "v_proj"}
    assert len(names) == 2 * 2 * 2  # 2 layers x 2 modules x (A, B)
    report = parameter_report(peft_model)
    # q: 4*(128+128), v: 4*(128+64), per layer
    assert report["lora_params"] == report["trainable_params"] == 2 * (4 * 256 + 4 * 192)
    assert report["projector_params"] == report["other_trainable_params"] == 0
    assert_counts_consistent(peft_model, report)


def test_tied_weights_are_counted_once(model):
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied
    with_duplicates = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    base_total = unique_param_count(model)
    assert with_duplicates == base_total + model.lm_head.weight.numel()
    peft_model = apply_lora(model, {"target_modules": "q_proj"})
    report = parameter_report(peft_model)
    assert report["total_params"] == base_total + report["lora_params"]
    assert (report["trainable_params"], report["total_params"]) == peft_model.get_nb_trainable_parameters()


def test_all_linear_adapts_every_linear_but_lm_head(model):
    peft_model = apply_lora(model, {"target_modules": "all-linear"})
    adapted = {n.split(".")[-4] for n in trainable_names(peft_model)}
    assert adapted == set(LINEAR)
    assert_counts_consistent(peft_model, parameter_report(peft_model))


def test_inference_mode_freezes_the_adapter(model):
    peft_model = apply_lora(model, {"target_modules": "q_proj", "inference_mode": True})
    report = parameter_report(peft_model)
    assert report["trainable_params"] == 0 and report["trainable_percentage"] == 0.0
    assert report["lora_params"] > 0
    assert report["frozen_params"] == report["total_params"]


def test_dora_magnitude_counts_as_lora(model):
    peft_model = apply_lora(model, {"target_modules": "q_proj", "use_dora": True, "r": 2})
    report = parameter_report(peft_model)
    assert any("lora_magnitude_vector" in n for n in trainable_names(peft_model))
    assert report["other_trainable_params"] == 0
    # A: 2x128, B: 128x2, magnitude: 128, per layer
    assert report["lora_params"] == 2 * (256 + 256 + 128)
    assert_counts_consistent(peft_model, report)


def test_apply_lora_rejects_a_typo_before_peft_runs(model, monkeypatch):
    import peft

    def never(*args, **kwargs):
        raise AssertionError("get_peft_model must not be reached")

    monkeypatch.setattr(peft, "get_peft_model", never)
    with pytest.raises(ConfigError) as info:
        apply_lora(model, {"target_modules": ["q_proj", "v_prj"]})
    assert "Did you mean v_proj" in str(info.value)
    assert not any(is_lora(n) for n, _ in model.named_parameters())


def test_unsupported_target_layer_is_a_runtime_error(model):
    with pytest.raises(RuntimeError, match="peft could not apply LoRA to LlamaForCausalLM") as info:
        apply_lora(model, {"target_modules": "input_layernorm"})
    assert not isinstance(info.value, ConfigError)
    assert info.value.__cause__ is not None


def test_peft_failure_is_wrapped_as_runtime_error(model, monkeypatch):
    import peft

    def boom(*args, **kwargs):
        raise KeyError("broken")

    monkeypatch.setattr(peft, "get_peft_model", boom)
    with pytest.raises(RuntimeError, match="broken"):
        apply_lora(model, {"target_modules": "q_proj"})


def test_format_report_lists_every_key(model):
    text = format_report(parameter_report(apply_lora(model, {"target_modules": "q_proj"})))
    for key in REPORT_KEYS:
        assert key in text
    assert "%" in text


# ---------------------------------------------------------------------------------------------
# Isolation


def test_other_trainable_parameters_raise_naming_them(model):
    peft_model = apply_lora(model, {"target_modules": "q_proj"})
    norm = peft_model.base_model.model.model.norm.weight
    norm.requires_grad_(True)
    with pytest.raises(TrainabilityError) as info:
        parameter_report(peft_model)
    assert isinstance(info.value, RuntimeError)
    assert "base_model.model.model.norm.weight" in str(info.value)
    assert "1 parameter tensors" in str(info.value)


def test_allow_other_trainable_counts_them_instead(model):
    peft_model = apply_lora(model, {"target_modules": "q_proj"})
    peft_model.base_model.model.model.norm.weight.requires_grad_(True)
    report = parameter_report(peft_model, allow_other_trainable=True)
    assert report["other_trainable_params"] == 128
    assert report["trainable_params"] == report["lora_params"] + 128
    assert_counts_consistent(peft_model, report)


def test_a_plain_unwrapped_model_is_all_other(model):
    with pytest.raises(TrainabilityError, match="and .* more"):
        parameter_report(model)  # every weight trainable: more than 10 names, so the list is cut


# ---------------------------------------------------------------------------------------------
# Multimodal-shaped models


class VisionLanguageModel(nn.Module):
    """An LLM wrapped with LoRA beside a projector trained in full, as in LLaVA-style models."""

    def __init__(self, llm: nn.Module):
        super().__init__()
        self.vision_tower = nn.Linear(16, 32)
        self.vision_tower.requires_grad_(False)
        self.projector = nn.Linear(32, 128)
        self.llm = llm


def test_outer_projector_beside_a_lora_llm_is_projector_params(model):
    vlm = VisionLanguageModel(apply_lora(model, {"target_modules": "q_proj,v_proj"}))
    report = parameter_report(vlm)
    projector = 32 * 128 + 128
    assert report["projector_params"] == projector
    assert report["other_trainable_params"] == 0
    assert report["trainable_params"] == report["lora_params"] + projector
    assert report["total_params"] == report["trainable_params"] + report["frozen_params"]
    assert report["total_params"] == unique_param_count(vlm)


def test_outer_projector_with_another_name_needs_a_pattern(model):
    vlm = VisionLanguageModel(apply_lora(model, {"target_modules": "q_proj"}))
    vlm.vision_tower.requires_grad_(True)
    with pytest.raises(TrainabilityError, match="vision_tower.weight"):
        parameter_report(vlm)
    report = parameter_report(vlm, projector_patterns=("projector", "vision_tower"))
    assert report["projector_params"] == (32 * 128 + 128) + (16 * 32 + 32)


def test_projector_trained_through_modules_to_save(model):
    model.model.projector = nn.Linear(128, 128)  # an in-LLM projector, as multimodal Llamas have
    peft_model = apply_lora(model, {"target_modules": "q_proj", "modules_to_save": "projector"})
    names = trainable_names(peft_model)
    assert any(".projector.modules_to_save." in n for n in names)
    report = parameter_report(peft_model)
    assert report["projector_params"] == 128 * 128 + 128
    assert report["other_trainable_params"] == 0
    assert_counts_consistent(peft_model, report)


def test_lm_head_in_modules_to_save_counts_as_projector(model):
    peft_model = apply_lora(model, {"target_modules": "q_proj", "modules_to_save": ["lm_head"]})
    report = parameter_report(peft_model)
    assert report["projector_params"] == model.lm_head.weight.numel() == model.config.vocab_size * 128
    assert report["other_trainable_params"] == 0
    assert_counts_consistent(peft_model, report)


# ---------------------------------------------------------------------------------------------
# Logging is the caller's job


def test_apply_lora_inside_an_active_run_logs_nothing_to_it(model, tracking_uri):
    import mlflow
    from mlflow import MlflowClient

    with mlflow.start_run() as run:
        peft_model = apply_lora(model, {"r": 4, "target_modules": "q_proj,v_proj"})
    data = MlflowClient(tracking_uri).get_run(run.info.run_id).data
    assert peft_model.peft_config["default"].r == 4
    assert data.params == {} and data.metrics == {}


# ---------------------------------------------------------------------------------------------
# Property tests

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

valid_settings = st.fixed_dictionaries(
    {
        "r": st.integers(1, 16),
        "lora_alpha": st.floats(0.5, 64, allow_nan=False),
        "lora_dropout": st.floats(0, 0.9),
        "target_modules": st.lists(st.sampled_from(MODULES), min_size=1, max_size=7, unique=True),
        "use_rslora": st.booleans(),
        "use_dora": st.booleans(),
        "bias": st.just("none"),
        "modules_to_save": st.sampled_from([[], ["lm_head"], ["model.norm"], ["post_attention_layernorm"]]),
    }
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(raw=valid_settings)
def test_property_only_lora_and_saved_modules_train(base_model, raw):
    peft_model = apply_lora(copy.deepcopy(base_model), raw)
    saved = tuple(raw["modules_to_save"])
    for name, param in peft_model.named_parameters():
        allowed = is_lora(name) or any(f".{m}.modules_to_save." in name for m in saved)
        assert param.requires_grad == allowed, name
    report = parameter_report(peft_model)
    assert report["other_trainable_params"] == 0
    assert report["lora_params"] > 0
    assert (report["projector_params"] > 0) == bool(saved)
    assert_counts_consistent(peft_model, report)
    adapted = {n.split(".")[-4] for n in trainable_names(peft_model) if is_lora(n)}
    assert adapted == set(raw["target_modules"])


class Untouchable:
    """A sentinel model: any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the model was touched ({name}) before the config was validated")


BAD = {
    "r": st.sampled_from([0, -4, "four", 2.5]),
    "lora_alpha": st.sampled_from([0, -1, "inf", "a"]),
    "lora_dropout": st.sampled_from([1, -0.5, "high"]),
    "target_modules": st.sampled_from([[], ","]),
    "bias": st.sampled_from(["both", "lora"]),
    "task_type": st.sampled_from(["GPT", "causal"]),
    "inference_mode": st.sampled_from(["sometimes", 3]),
    "use_rslora": st.sampled_from(["rs"]),
    "use_dora": st.sampled_from(["d"]),
    "modules_to_save": st.sampled_from([7]),
    "rank": st.just(8),
}
bad_settings = st.sets(st.sampled_from(sorted(BAD)), min_size=1).flatmap(
    lambda keys: st.fixed_dictionaries({k: BAD[k] for k in keys})
)


@settings(max_examples=40, deadline=None)
@given(bad=bad_settings, good_r=st.integers(1, 64))
def test_property_bad_config_fails_before_the_model_is_touched(bad, good_r):
    import peft

    raw = {"r": good_r, **bad}
    original = peft.get_peft_model
    peft.get_peft_model = Untouchable()  # hypothesis forbids function-scoped monkeypatch here
    try:
        with pytest.raises(ConfigError) as info:
            apply_lora(Untouchable(), raw)
    finally:
        peft.get_peft_model = original
    problems = info.value.problems
    assert len(problems) == len(bad)
    for name in bad:
        assert any(f"`{name}`" in p for p in problems), (name, problems)
