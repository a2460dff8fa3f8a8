"""4. Artifact size: the logged loraflow model against its adapter + tokenizer bytes.

Sizes are deterministic, so this runs once (no repeats). The reference-mode model records the
base as a Hub id + commit (the benchmark's offline Hub-cache repo); the embedded-mode model copies
the base weights in. "Adapter + tokenizer" is what `PeftModel.save_pretrained` and
`tokenizer.save_pretrained` write on their own.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from benchmarks import common, fixtures


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(root: str) -> dict[str, Any]:
    from peft import PeftModel

    from loraflow import flavor
    from loraflow.flavor.bases import load_base_model, load_tokenizer

    root_path = Path(root)
    tokenizer = load_tokenizer(fixtures.HUB_REPO)
    hub_model = PeftModel.from_pretrained(fixtures.load_hub_base(), str(root_path / "adapter"))
    local_model = PeftModel.from_pretrained(load_base_model(str(root_path / "base")), str(root_path / "adapter"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        hub_model.save_pretrained(str(tmp_path / "adapter"))
        tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
        flavor.save_model(hub_model, tmp_path / "reference", tokenizer, base_model=fixtures.HUB_REPO, base_mode="reference")
        flavor.save_model(local_model, tmp_path / "embedded", tokenizer, base_model=str(root_path / "base"),
                          base_mode="embedded")
        parts = {p.name: dir_bytes(p) if p.is_dir() else p.stat().st_size for p in (tmp_path / "reference").iterdir()}
        return {
            "adapter_bytes": dir_bytes(tmp_path / "adapter"),
            "tokenizer_bytes": dir_bytes(tmp_path / "tokenizer"),
            "reference_bytes": dir_bytes(tmp_path / "reference"),
            "embedded_bytes": dir_bytes(tmp_path / "embedded"),
            "base_weights_bytes": sum(f.stat().st_size for f in (root_path / "base").glob("*.safetensors")),
            "reference_parts": parts,
        }


def run(root: Path, log=print) -> dict[str, Any]:
    if not (root / "adapter").exists():
        log("    (no adapter from benchmark 1: training one)")
        common.run_child("bench_train", "loraflow_side", {"root": str(root), "save_adapter": True, "measure_peak": False})
    out = common.run_child("bench_size", "measure", {"root": str(root)})
    out["ratio"] = out["reference_bytes"] / (out["adapter_bytes"] + out["tokenizer_bytes"])
    return out
