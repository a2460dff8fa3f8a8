"""The dtype policy: its table on device facts given by hand (no GPU needed), and the casts it makes."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from loraflow.flavor import dtypes, trainable
from loraflow.flavor.dtypes import DeviceFacts, PrecisionRefused, plan_dtypes
from loraflow.flavor.fingerprint import base_fingerprint, convert_base
from loraflow.flavor.save import stored_dtype

CPU = DeviceFacts("cpu", cpu_name="AVX2")
CPU_AMX = DeviceFacts("cpu", cpu_native_bf16=True, cpu_name="AVX512")
AMPERE = DeviceFacts("cuda", cuda_bf16=True, cuda_capability=(8, 0))
TURING = DeviceFacts("cuda", cuda_capability=(7, 5))
PASCAL = DeviceFacts("cuda", cuda_capability=(6, 1))


@pytest.mark.parametrize("precision, facts, expected", [
    ("auto", CPU, ("float32", "float32", "no")),
    ("fp32", CPU, ("float32", "float32", "no")),
    ("bf16", CPU, ("bfloat16", "bfloat16", "bf16")),
    ("bf16", CPU_AMX, ("bfloat16", "bfloat16", "bf16")),
    ("auto", CPU_AMX, ("float32", "float32", "no")),  # fp32 on a CPU unless asked, even with AMX
    ("auto", AMPERE, ("bfloat16", "bfloat16", "bf16")),
    ("bf16", AMPERE, ("bfloat16", "bfloat16", "bf16")),
    ("fp16", AMPERE, ("float16", "float16", "fp16")),
    ("fp32", AMPERE, ("float32", "float32", "no")),
    ("auto", TURING, ("float16", "float16", "fp16")),
    ("auto", PASCAL, ("float32", "float32", "no")),
])
def test_the_plan_follows_the_table(precision, facts, expected):
    assert plan_dtypes(precision, facts)[:3] == expected


def test_bf16_on_a_cpu_without_it_is_allowed_with_a_note_naming_the_cost_and_the_fix():
    note = plan_dtypes("bf16", CPU).note
    assert note and "AVX2" in note and "slower than fp32" in note and "auto or fp32" in note
    assert plan_dtypes("bf16", CPU_AMX).note is None and plan_dtypes("auto", CPU).note is None


def test_the_note_is_given_once_per_process(caplog, monkeypatch):
    monkeypatch.setattr(trainable, "_warned", set())
    plan = plan_dtypes("bf16", CPU)
    with caplog.at_level(logging.WARNING, logger="loraflow.flavor.trainable"):
        trainable.warn_once(plan)
        trainable.warn_once(plan)
    assert [r.getMessage() for r in caplog.records] == [plan.note]


@pytest.mark.parametrize("precision, facts, match", [
    ("fp16", CPU, "`precision` fp16 needs a CUDA GPU, none is available; use auto, fp32 or bf16"),
    ("bf16", TURING, r"`precision` bf16: this GPU \(compute capability 7.5\) has no bf16; use auto, fp16 or fp32"),
    ("fp8", CPU, "`precision` must be one of auto, fp32, bf16, fp16, got 'fp8'"),
])
def test_a_precision_the_device_cannot_compute_in_is_refused_naming_the_fix(precision, facts, match):
    with pytest.raises(PrecisionRefused, match=match):
        plan_dtypes(precision, facts)


def test_this_machine_is_described_by_its_facts():
    facts = dtypes.device_facts("cpu")
    assert facts.type == "cpu" and facts.cpu_name == torch.backends.cpu.get_cpu_capability()
    assert isinstance(facts.cpu_native_bf16, bool)


@pytest.mark.parametrize("requested, expected", [
    ("bf16", "bfloat16"), ("float16", "float16"), (torch.float64, "float64"), ("torch.bfloat16", "bfloat16"),
    (None, "float32"), ("auto", "float32"),  # the CPU's default
])
def test_serving_dtype_takes_names_and_defaults_to_the_devices(requested, expected):
    assert dtypes.serving_dtype(requested, "cpu") == expected


@pytest.mark.parametrize("bad", ["int8", "long", "nope"])
def test_serving_dtype_refuses_what_is_not_a_floating_dtype(bad):
    with pytest.raises(ValueError, match=f"`dtype` must be a floating-point torch dtype.*got '{bad}'"):
        dtypes.serving_dtype(bad, "cpu")


def test_a_base_cast_after_loading_keeps_the_fingerprint_of_its_stored_weights(tiny_model):
    stored = tiny_model.to(torch.bfloat16)
    expected = base_fingerprint(stored)
    convert_base(stored, "float32")
    assert {p.dtype for p in stored.parameters()} == {torch.float32}
    assert stored_dtype(stored) == "bfloat16"
    assert base_fingerprint(stored) == expected
    changed = copy.deepcopy(stored)
    with torch.no_grad():
        changed.get_output_embeddings().weight.data[0, 0] += 1  # still the weights themselves
    assert base_fingerprint(changed) != expected
    convert_base(stored, "float16")  # cast twice: still the stored weights' fingerprint
    assert base_fingerprint(stored) == expected


def test_a_base_cast_down_keeps_the_fingerprint_of_its_stored_weights(tiny_model):
    expected = base_fingerprint(tiny_model)  # stored in fp32
    convert_base(tiny_model, "bfloat16")  # as on a GPU with bf16: fp32 cannot be recovered from it
    assert {p.dtype for p in tiny_model.parameters()} == {torch.bfloat16}
    assert stored_dtype(tiny_model) == "float32"
    assert base_fingerprint(tiny_model) == expected


def test_the_adapter_is_kept_in_fp32_and_the_run_reports_the_effective_dtypes(tiny_model):
    from loraflow.base_models import effective_dtypes
    from loraflow.config import lora_settings
    from loraflow.lora import apply_lora

    model = apply_lora(convert_base(tiny_model.to(torch.bfloat16), "bfloat16"), lora_settings({"r": 4}))
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    trainable.keep_adapter_fp32(model)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert effective_dtypes(model, "bf16") == {"base_dtype": "bfloat16", "compute_dtype": "bfloat16"}
    assert effective_dtypes(convert_base(model.get_base_model(), "float32"), "no") == {
        "base_dtype": "float32", "compute_dtype": "float32"}
