"""Off switches for the speed tricks in the code a saved model ships (generation, loading, digests).

`LORAFLOW_DISABLE` names the tricks to turn off, comma-separated, or `all`; `loraflow.speed` is the
one list of every trick, training's included. Each trick gives the results of the plain path
(tested); what it buys is measured by the benchmarks (docs/benchmarks.md).
"""

from __future__ import annotations

import os

ENV = "LORAFLOW_DISABLE"

# Figures: generation's in benchmarks/bench_infer.py, pread_load's in bench_qlora.py, digest_cache's
# in RESULTS.md (load time).
TRICKS = {
    "ragged_prefill": "a batch's prompts are prefilled 8 at a time, each group padded only to its own longest",
    "compaction": "rows whose answer has ended leave the batch and its KV cache while the others generate",
    "static_cache": "on CPU, generation writes into a preallocated KV cache instead of concatenating at every token",
    "digest_cache": "a base outside the artifact has its tensor digests kept per file while the file is unchanged",
    "pread_load": "a base quantized as it loads is read with pread, so each stored tensor lives only while it is quantized",
}


def disabled() -> set[str]:
    """The names `LORAFLOW_DISABLE` holds, as written (`all` among them turns every trick off)."""
    return {name.strip() for name in os.environ.get(ENV, "").split(",") if name.strip()}


def enabled(trick: str) -> bool:
    """Whether `trick` is on: every trick is, unless `LORAFLOW_DISABLE` names it or says `all`."""
    names = disabled()
    return "all" not in names and trick not in names
