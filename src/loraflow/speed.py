"""Speed tricks behind one door: each is a function or a check, and each can be switched off.

`LORAFLOW_DISABLE` names the tricks to turn off, comma-separated (`LORAFLOW_DISABLE=head_at_labels`),
or `all`: the run then takes the plain path, to check a result against it or to rule a trick out.
`TRICKS` lists them all: training's are here, those of the code a saved model ships (generation,
loading, digests) in `loraflow.flavor.switches`, which has no import of training. Every trick gives
the results of the plain path (tests/test_speed.py, tests/flavor/test_switches.py); what each buys
is measured by the benchmarks (docs/benchmarks.md), not restated here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from loraflow.data.tables import IGNORE_INDEX
from loraflow.flavor import switches
from loraflow.flavor.switches import ENV

if TYPE_CHECKING:
    import torch

# Figures: benchmarks/speed_results.md (bench_speed.py); heap_trim's in bench_qlora.py.
TRAINING_TRICKS = {
    "head_at_labels": "the LM head and the loss run only at positions that predict a label token, not at every position",
    "cpu_micro_batches": "on CPU a batch runs in micro-batches of at most 1024 tokens, each cut to its own longest row: "
                         "less padding, bounded activations",
    "cpu_dropout": "on CPU, LoRA dropout draws its keep-masks the cheaper way (loraflow.dropout)",
    "heap_trim": "a quantized model training on CPU gives glibc's kept heap back after each decoder layer (loraflow.heap)",
}
TRICKS = {**TRAINING_TRICKS, **switches.TRICKS}


def enabled(trick: str) -> bool:
    """Whether `trick` (a key of `TRICKS`) is on: every trick is, unless `LORAFLOW_DISABLE` names it."""
    if trick not in TRICKS:
        raise KeyError(f"no speed trick {trick!r}; known: {', '.join(TRICKS)}")
    return switches.enabled(trick)


def unknown_names() -> list[str]:
    """Names in `LORAFLOW_DISABLE` that are not tricks (a typo would silently change nothing)."""
    return sorted(switches.disabled() - set(TRICKS) - {"all"})


def _causal_lm(model: Any) -> Any:
    """The transformers model inside accelerate's and peft's wrappers."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def causal_lm_loss(model: Any, batch: dict[str, Any]) -> "torch.Tensor":
    """The mean next-token loss over `batch`'s label tokens (`labels` != -100), as `model(**batch).loss`.

    With `head_at_labels` on, the LM head and the cross-entropy see only the hidden states of the
    positions that predict a label token (prompt, system and padding positions cost no
    vocabulary-sized logits): a pre-hook on the model's output embeddings picks those rows, for the
    model's own head code to run on them (its soft-capping or scaling included).

    Relies on transformers' causal LMs calling their output embeddings once, on the hidden states
    of every position, and returning those logits as they come; a model that reshapes them gets
    the plain loss instead (checked on every call).
    """
    inputs = {**batch, "use_cache": False}  # no KV cache while training or scoring
    head = _causal_lm(model).get_output_embeddings() if enabled("head_at_labels") else None
    if head is None:
        return model(**inputs).loss
    import torch.nn.functional as F

    labels = inputs.pop("labels")
    targets = labels[:, 1:]
    where = targets != IGNORE_INDEX
    kept, shape = int(where.sum()), tuple(labels.shape)

    def pick(_module: Any, args: tuple) -> tuple | None:  # hidden states of every position -> those predicting a label
        hidden = args[0]
        return (hidden[:, :-1][where], *args[1:]) if tuple(hidden.shape[:2]) == shape else None

    handle = head.register_forward_pre_hook(pick)
    try:
        logits = model(**inputs).logits
    finally:
        handle.remove()
    if tuple(logits.shape[:-1]) != (kept,):  # a model that reshapes its logits after the head
        return model(**inputs, labels=labels).loss
    return F.cross_entropy(logits.float(), targets[where])


@contextlib.contextmanager
def cpu_dropout(model: Any, device: "torch.device") -> Iterator[int]:
    """While inside, on CPU, `model`'s LoRA dropout modules draw their masks the cheaper way
    (`loraflow.dropout`); yields how many were swapped, and puts peft's own back on the way out."""
    if device.type != "cpu" or not enabled("cpu_dropout"):
        yield 0
        return
    from loraflow import dropout

    with dropout.on_cpu(model) as swapped:
        yield swapped


@contextlib.contextmanager
def heap_trim(model: Any) -> Iterator[int]:
    """While inside, a bitsandbytes-quantized `model` on CPU gives glibc's kept heap back after each
    decoder layer's forward (`loraflow.heap`); yields how many layers are hooked. The hooks are
    removed on the way out, so a user's model is left as it came."""
    quantized = getattr(_causal_lm(model), "hf_quantizer", None) is not None
    if not (quantized and enabled("heap_trim")):
        yield 0
        return
    from loraflow import heap

    handles = heap.trim_after_each_layer(_causal_lm(model))
    try:
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()
