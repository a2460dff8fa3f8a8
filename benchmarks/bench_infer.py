"""3. Inference: the same trained adapter logged with loraflow and with `mlflow.transformers`.

Setup (one child, untimed): load the base from the (offline) Hub cache so both flavors record a
Hub reference, apply the adapter trained by the loraflow side of benchmark 1, log it with both
flavors to a local sqlite store, and compute the reference outputs of the in-memory model
(`generate` one prompt at a time, greedy, 32 new tokens).

Timed (a fresh child per side, alternating): `mlflow.pyfunc.load_model(uri)`, one warm-up
predict on one prompt, then `predict` on 64 prompts of mixed length with max_new_tokens=32,
greedy. torch, transformers, peft and mlflow are imported before the load is timed, so load time
is the flavor's own work, not the import of the frameworks both sides share. Load times are small
and noisy, so more fresh children (alternating) time the load alone; the reported load time is the
median over all of a side's loads. Those load-only rounds also time loraflow with its base digest
cache off, reported apart (the base is then hashed during every load).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from benchmarks import common, fixtures

MAX_NEW_TOKENS = 32
N_PROMPTS = 64
LOADS_PER_REPEAT = 5  # load-only rounds per repeat: load times are small and noisy, so take more


def _tracking(root: Path) -> str:
    import mlflow

    uri = f"sqlite:///{root / 'infer.db'}"
    mlflow.set_tracking_uri(uri)
    name = "bench-infer"
    if mlflow.get_experiment_by_name(name) is None:
        mlflow.create_experiment(name, artifact_location=(root / "infer-artifacts").as_uri())
    mlflow.set_experiment(name)
    return uri


def log_models(root: str) -> dict[str, Any]:
    """Log the adapter with both flavors; return their URIs and the in-memory reference outputs."""
    import mlflow
    import torch
    from peft import PeftModel

    from loraflow import flavor
    from loraflow.flavor.bases import load_tokenizer

    root_path = Path(root)
    _tracking(root_path)
    tokenizer = load_tokenizer(fixtures.HUB_REPO)
    model = PeftModel.from_pretrained(fixtures.load_hub_base(), str(root_path / "adapter")).eval()
    prompts = fixtures.prompts(root_path, N_PROMPTS)
    reference = []
    with torch.inference_mode():
        for p in prompts:
            ids = tokenizer(p, return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            reference.append(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    # mlflow.transformers asks the Hub API for the repo's latest commit; offline, answer as the
    # Hub would (the cache's commit), like the offline Hub cache stands in for the download.
    import mlflow.transformers.flavor_config as transformers_flavor_config

    transformers_flavor_config.get_latest_commit_for_repo = lambda repo: fixtures.HUB_COMMIT
    with mlflow.start_run():
        ours = flavor.log_model(model, "loraflow-model", tokenizer, base_model=fixtures.HUB_REPO, base_mode="reference")
        builtin = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer}, name="transformers-model",
            task="text-generation", model_config={"max_new_tokens": MAX_NEW_TOKENS, "do_sample": False},
            pip_requirements=builtin_default_requirements(model),
        )
    return {"loraflow_uri": ours.model_uri, "transformers_uri": builtin.model_uri, "prompts": prompts,
            "reference": reference}


def builtin_default_requirements(model) -> list[str]:
    """The requirements `mlflow.transformers.log_model` records for this PEFT model by default.

    For a PEFT model it never infers requirements (that would load the model); it records
    `get_default_pip_requirements(model)`. That function pins torchvision, which this environment
    does not have, so it raises here; its other packages are pinned the same way.
    """
    import mlflow.transformers
    from mlflow.utils.requirements_utils import _get_pinned_requirement

    try:
        return mlflow.transformers.get_default_pip_requirements(model)
    except ModuleNotFoundError:
        return [_get_pinned_requirement(p) for p in ("transformers", "torch", "accelerate", "peft")]


def load_side(root: str, uri: str, digest_cache: bool = True) -> dict[str, Any]:
    """Time `mlflow.pyfunc.load_model(uri)` in this fresh process (the frameworks imported first).

    `digest_cache=False` turns loraflow's base digest cache off (`LORAFLOW_DIGEST_CACHE=0`), so the
    base is hashed during the load, as on a machine loading it for the first time.
    """
    if not digest_cache:
        os.environ["LORAFLOW_DIGEST_CACHE"] = "0"  # by name: importing loraflow here would precompile it
    import mlflow
    import pandas  # noqa: F401  (shared framework imports, outside the timed load)
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    _tracking(Path(root))
    started = time.perf_counter()
    model = mlflow.pyfunc.load_model(uri)
    return {"load_s": time.perf_counter() - started, "model": model}


def predict_side(root: str, flavor_name: str, uri: str, prompts: list[str]) -> dict[str, Any]:
    """Load one logged model through pyfunc and time load + predict."""
    import pandas as pd

    loaded = load_side(root, uri)
    model, load_s = loaded["model"], loaded["load_s"]
    if flavor_name == "loraflow":
        def predict(ps):
            return model.predict(pd.DataFrame({"prompt": ps}), params={"max_new_tokens": MAX_NEW_TOKENS})["text"].tolist()
    else:  # max_new_tokens and greedy are in the logged model_config
        def predict(ps):
            return [str(t) for t in model.predict(ps)]
    predict(prompts[:1])  # warm-up
    started = time.perf_counter()
    texts = predict(prompts)
    predict_s = time.perf_counter() - started
    return {"load_s": load_s, "predict_s": predict_s, "texts": texts, "model": _describe(model, flavor_name)}


def load_side_result(root: str, uri: str, digest_cache: bool = True) -> dict[str, Any]:
    """`load_side` without the model (what a load-only child returns)."""
    return {"load_s": load_side(root, uri, digest_cache)["load_s"]}


def _describe(model, flavor_name: str) -> dict[str, Any]:
    """What the loaded pyfunc model runs: its torch module's class and parameter dtypes."""
    impl = model._model_impl  # the flavor's pyfunc wrapper
    module = impl.loaded.model if flavor_name == "loraflow" else impl.pipeline.model
    return {"class": type(module).__name__, "dtypes": sorted({str(p.dtype) for p in module.parameters()})}


def run(root: Path, repeats: int, log=print) -> dict[str, Any]:
    if not (root / "adapter").exists():
        log("    (no adapter from benchmark 1: training one)")
        common.run_child("bench_train", "loraflow_side", {"root": str(root), "save_adapter": True, "measure_peak": False})
    setup = common.run_child("bench_infer", "log_models", {"root": str(root)}, timeout=1800)
    prompts = setup["prompts"]

    def side(name: str):
        uri = setup[f"{name}_uri"]
        return lambda i: common.run_child("bench_infer", "predict_side",
                                          {"root": str(root), "flavor_name": name, "uri": uri, "prompts": prompts})

    def load_only(name: str, digest_cache: bool = True):
        uri = setup[f"{name}_uri"]
        return lambda i: common.run_child("bench_infer", "load_side_result",
                                          {"root": str(root), "uri": uri, "digest_cache": digest_cache})

    samples = common.alternate({"loraflow": side("loraflow"), "transformers": side("transformers")}, repeats, log)
    loads = common.alternate({"loraflow": load_only("loraflow"), "transformers": load_only("transformers"),
                              "loraflow_uncached": load_only("loraflow", digest_cache=False)},
                             repeats * LOADS_PER_REPEAT, log)
    uncached = loads.pop("loraflow_uncached")
    out: dict[str, Any] = {"samples": samples, "loads": loads, "reference": setup["reference"], "prompts": prompts,
                           "uncached_load_s": common.median([r["load_s"] for r in uncached]),
                           "uncached_loads": uncached}
    for name, rows in samples.items():
        texts = rows[0]["texts"]
        continuations = [continuation(t, p) for t, p in zip(texts, prompts)]
        out[name] = {
            "prompts_per_s": common.median([N_PROMPTS / r["predict_s"] for r in rows]),
            "predict_s": common.median([r["predict_s"] for r in rows]),
            "load_s": common.median([r["load_s"] for r in rows + loads[name]]),
            "load_n": len(rows + loads[name]),
            "load_samples": [r["load_s"] for r in rows + loads[name]],
            "continuations": continuations,
            "full_text": sum(t != c for t, c in zip(texts, continuations)),
            "matches_reference": sum(a == b for a, b in zip(continuations, setup["reference"])),
            "matches_reference_as_returned": sum(a == b for a, b in zip(texts, setup["reference"])),
            "deterministic": all(r["texts"] == texts for r in rows),
        }
    return out


def continuation(text: str, prompt: str) -> str:
    """The generated part of an output: the built-in text-generation pipeline returns the prompt
    followed by the continuation (`return_full_text` defaults to True), while the reference (and
    loraflow) hold the continuation only. Compare like with like: drop a leading copy of the prompt."""
    return text[len(prompt):] if text.startswith(prompt) else text
