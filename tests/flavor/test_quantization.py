"""QLoRA models through the flavor: saved with the unquantized base and the quantization record,
re-quantized at load (natively and through pyfunc) to the very model that trained, trainable again,
and loadable unquantized without bitsandbytes."""

from __future__ import annotations

import sys

import mlflow.pyfunc
import pytest
import torch
from mlflow.exceptions import MlflowException

from loraflow import flavor
from loraflow.base_models import load_for_training
from loraflow.config import lora_settings
from loraflow.flavor.fingerprint import base_fingerprint
from loraflow.flavor.trainable import quantization_record
from loraflow.lora import apply_lora
from model_helpers import PROMPTS, logits, mlmodel

pytest.importorskip("bitsandbytes")


def qlora_model(quantization: str):
    """LoRA on q/v of the built-in base quantized by `quantization`, with non-zero B (a fixed seed)."""
    base, tokenizer = load_for_training("builtin:tiny", quantization=quantization, precision="fp32")
    model = apply_lora(base, lora_settings(r=4, lora_dropout=0.0, target_modules="q_proj,v_proj"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval(), tokenizer


@pytest.fixture(scope="module", params=["nf4", "int8"])
def saved(request, tmp_path_factory):
    """(quantization, the model in memory, its tokenizer, the folder it was saved to: embedded base)."""
    model, tokenizer = qlora_model(request.param)
    path = tmp_path_factory.mktemp(f"qlora-{request.param}") / "model"
    flavor.save_model(model, path, tokenizer, base_model="builtin:tiny")
    return request.param, model, tokenizer, path


def test_the_model_records_its_quantization_and_requires_bitsandbytes(saved):
    quantization, _, _, path = saved
    conf = mlmodel(path)["flavors"]["loraflow"]
    expected = {"method": "int8"} if quantization == "int8" else {
        "method": "nf4", "compute_dtype": "float32", "double_quant": True}
    assert conf["quantization"] == expected
    requirements = (path / "requirements.txt").read_text().split()
    assert any(r.startswith("bitsandbytes==") for r in requirements)
    assert not any(r.startswith("bitsandbytes") for r in flavor.get_default_pip_requirements())


def test_the_embedded_base_is_unquantized_and_its_fingerprint_is_the_unquantized_bases(saved, tiny_model):
    """The artifact holds the original weights, so the recorded fingerprint is the plain base's."""
    import safetensors.torch

    _, _, _, path = saved
    conf = mlmodel(path)["flavors"]["loraflow"]
    assert conf["base"]["fingerprint"] == base_fingerprint(tiny_model)
    stored = safetensors.torch.load_file(path / "base" / "model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.float32}


def test_load_model_quantizes_again_and_reproduces_the_trained_models_logits(saved):
    quantization, model, tokenizer, path = saved
    loaded, _ = flavor.load_model(str(path))
    layer = loaded.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert type(layer).__name__ == ("Linear8bitLt" if quantization == "int8" else "Linear4bit")
    assert torch.equal(logits(loaded, tokenizer), logits(model, tokenizer))


def test_pyfunc_greedy_output_equals_the_natively_reloaded_quantized_models(saved):
    quantization, _, _, path = saved
    native, tokenizer = flavor.load_model(str(path))
    expected = []
    for prompt in PROMPTS:  # one prompt at a time, by `generate` itself
        ids = tokenizer(prompt, return_tensors="pt")
        out = native.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expected.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    pyfunc = mlflow.pyfunc.load_model(str(path))
    if quantization == "int8":  # LLM.int8 picks its fp16 outlier columns over the whole batch, so a row's
        # logits depend on the rows beside it (by 0.05 here): equal outputs hold request by request
        served = [pyfunc.predict([prompt], params={"max_new_tokens": 8})["text"][0] for prompt in PROMPTS]
    else:
        served = pyfunc.predict(PROMPTS, params={"max_new_tokens": 8})["text"].tolist()
    assert served == expected


def test_a_trainable_reload_continues_qlora_training(saved):
    quantization, _, _, path = saved
    model, tokenizer = flavor.load_model(str(path), is_trainable=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert type(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__ in (
        "Linear4bit", "Linear8bitLt")
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_quantization_none_loads_the_adapter_on_the_full_precision_base(saved, monkeypatch):
    """Without bitsandbytes at all: the base's own nn.Linear layers, close to the quantized model."""
    _, model, tokenizer, path = saved
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` fails
    loaded, _ = flavor.load_model(str(path), quantization="none")
    assert type(loaded.get_base_model().model.layers[0].self_attn.q_proj.base_layer) is torch.nn.Linear
    reference = logits(model, tokenizer)
    difference = (logits(loaded, tokenizer) - reference).abs().max().item()
    assert 0 < difference < 0.25 * reference.abs().max().item()


def test_without_bitsandbytes_a_quantized_load_says_which_extra_to_install(saved, monkeypatch):
    _, _, _, path = saved
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(MlflowException, match=r"loraflow\[quantization\].*quantization='none'"):
        flavor.load_model(str(path))


def test_arguments_a_quantized_model_cannot_take_are_refused(saved):
    _, _, _, path = saved
    with pytest.raises(MlflowException, match="`quantization` must be None .* got 'nf8'"):
        flavor.load_model(str(path), quantization="nf8")
    with pytest.raises(MlflowException, match="`dtype` 'bfloat16' cannot be set"):
        flavor.load_model(str(path), dtype="bfloat16")


def test_a_changed_base_file_of_a_quantized_model_is_refused(saved, tmp_path):
    """The quantized base is verified by its files' fingerprint: flip one weight, the load fails."""
    import shutil

    import safetensors.torch

    _, _, _, path = saved
    copy = tmp_path / "model"
    shutil.copytree(path, copy)
    weights = copy / "base" / "model.safetensors"
    tensors = safetensors.torch.load_file(weights)
    name = next(n for n in sorted(tensors) if "q_proj" in n)
    tensors[name][0, 0] += 1.0
    safetensors.torch.save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(MlflowException, match="does not match the one the adapter was trained on"):
        flavor.load_model(str(copy))


def test_the_int8_matmuls_note_on_every_forward_is_not_shown(saved, caplog):
    """bitsandbytes logs "MatMul8bitLt: inputs will be cast ..." on every int8 forward: dropped."""
    import logging

    quantization, model, tokenizer, _ = saved
    with caplog.at_level(logging.DEBUG):
        logits(model, tokenizer)
    assert not [r for r in caplog.records if r.name.startswith("bitsandbytes")]
    if quantization == "int8":  # the filter is what keeps it quiet: without it, the line is logged
        from loraflow.flavor.quantization import _DropMessage

        log = logging.getLogger("bitsandbytes.autograd._functions")
        filters = [f for f in log.filters if isinstance(f, _DropMessage)]
        for f in filters:
            log.removeFilter(f)
        try:
            with caplog.at_level(logging.DEBUG):
                logits(model, tokenizer)
        finally:
            for f in filters:
                log.addFilter(f)
        assert any("MatMul8bitLt" in r.getMessage() for r in caplog.records)


def test_importing_loraflow_quiets_the_bitsandbytes_kernel_lines_that_peft_imports_bring():
    """peft imports bitsandbytes whenever it is installed, and on a CPU with AVX512-BF16 bitsandbytes
    tries an optional Hub kernel on import: its "Failed to load CPU gemm_4bit_forward" line, and
    `kernels`' "Skipping publisher trust check" when the Hub is offline, would reach every run's
    terminal, quantized or not. A plain `import loraflow` filters those two, and nothing else."""
    import subprocess
    import sys

    code = ("import logging, loraflow\n"
            "def kept(name, msg):\n"
            "    record = logging.LogRecord(name, logging.WARNING, 'x', 1, msg, None, None)\n"
            "    return logging.getLogger(name).filter(record)\n"
            "ops, hub = 'bitsandbytes.backends.cpu.ops', 'kernels._internals.hf_hub'\n"
            "print(kept(ops, 'Failed to load CPU gemm_4bit_forward from kernels-community: ...'), kept(ops, 'other'),\n"
            "      kept(hub, \"Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because\"),\n"
            "      kept(hub, \"Skipping publisher trust check for 'someone/else' because\"))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "True", "False", "True"]


def test_a_quantized_load_reads_the_checkpoint_with_pread_into_the_model_transformers_loads(monkeypatch):
    """The files are read, not mapped (a mapped file's pages stay resident through the load), and
    the model is the one `from_pretrained(path)` quantizes: same logits, config name, generation
    config, tied embeddings."""
    import safetensors
    from transformers import AutoModelForCausalLM, GenerationConfig

    import loraflow.flavor.quantization as q
    from loraflow.flavor.bases import builtin_dir, load_base_model, load_tokenizer

    kwargs = q.load_kwargs(quantization_record("nf4", "fp32"))
    backends, real_open = [], safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open",
                        lambda *a, **k: backends.append(k.get("backend")) or real_open(*a, **k))
    model = load_base_model("builtin:tiny", **kwargs)
    assert backends == ["pread"]
    path = str(builtin_dir("tiny"))
    expected = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    tokenizer = load_tokenizer(path)
    assert torch.equal(logits(model, tokenizer), logits(expected, tokenizer))
    assert model.config.name_or_path == model.name_or_path == expected.config.name_or_path == path
    assert model.generation_config.to_dict() == GenerationConfig.from_pretrained(path).to_dict()
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_base_whose_files_are_not_local_loads_quantized_as_transformers_does(monkeypatch):
    """A base `from_pretrained` must download (or one not in safetensors) goes through
    `from_pretrained` itself; the tensors bitsandbytes leaves unquantized then get storage of their
    own, out of the mapped file: same values, ties kept."""
    import loraflow.flavor.bases as bases
    import loraflow.flavor.quantization as q

    monkeypatch.setattr(bases, "local_weight_files", lambda *args: [])
    kwargs = q.load_kwargs(quantization_record("nf4", "fp32"))
    copy, calls = q.own_unquantized_tensors, []
    monkeypatch.setattr(q, "own_unquantized_tensors", lambda m: calls.append(m) or m)
    loaded = bases.load_base_model("builtin:tiny", **kwargs)
    assert calls == [loaded] and type(loaded.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    before = {name: (p.data_ptr(), p.detach().clone()) for name, p in loaded.named_parameters()
              if type(p).__name__ == "Parameter"}
    copy(loaded)
    after = dict(loaded.named_parameters())
    assert before and all(after[n].data_ptr() != ptr and torch.equal(after[n], v) for n, (ptr, v) in before.items())
    if loaded.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
