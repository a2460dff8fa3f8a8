"""Merging the adapter into the base, checked, and `--format merged`: a plain Hugging Face folder.

`load_source` loads the model through the flavor (fp32, verified) and merges it; `merge` is
`merge_and_unload` with the two things it gets wrong or cannot promise fixed around it: a tied
embedding that LoRA adapts is untied first (the delta would land in both matrices), and the
merged model's logits on a probe prompt must match the adapter model's before anything is written.
`--format transformers` merges through here too.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from loraflow.errors import LoraflowError
from loraflow.export import EXPORT_RECORD, ExportError, ExportResult
from loraflow.export.source import Source, provenance, target_dtype
from loraflow.export.target import write_folder, write_json

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


class Merged(NamedTuple):
    """What `load_source` returns."""

    model: "PreTrainedModel"
    tokenizer: "PreTrainedTokenizerBase"
    base_tied: bool
    """Whether the base tied its input and output embeddings (the merged model may no longer)."""


def load_source(source: Source, force: bool = False) -> Merged:
    """Load the model in fp32 (verified by loraflow) and merge the adapter into the base.

    A model trained on a quantized base (QLoRA) is merged, with `force` only, onto that base
    quantized as in training and dequantized (transformers' `dequantize`) in fp32: the weights the
    adapter learned beside. Merging into the quantized layers themselves (peft re-quantizes the
    sum) would round the update away; either way the merged weights are no longer the quantized
    ones, so the outputs change slightly.

    Raises:
        ExportError: the model cannot be loaded (corrupt adapter, different base, ...), a QLoRA
            model without `force`, or the merged model does not compute what the adapter model computes.
    """
    from mlflow.exceptions import MlflowException

    from loraflow.flavor.load import load_local

    quantization = source.conf.get("quantization")
    if quantization and not force:
        raise ExportError(lossy_merge_message(source.uri, quantization["method"]) + ": pass --force to export it so, "
                          "or --format adapter to keep the adapter exact")
    if quantization:
        logger.warning("%s", lossy_merge_message(source.uri, quantization["method"]))
    try:
        loaded = (load_local(source.path, dequantize=True) if quantization
                  else load_local(source.path, dtype="float32"))
    except (MlflowException, LoraflowError, OSError) as e:
        raise ExportError(f"cannot load the loraflow model {source.uri!r}: {e}") from e
    base_tied = bool(getattr(_text_config(loaded.model.get_base_model()), "tie_word_embeddings", False))
    return Merged(merge(loaded.model, loaded.tokenizer, source.uri), loaded.tokenizer, base_tied)


def lossy_merge_message(uri: str, method: str) -> str:
    return (f"{uri!r} was trained on a {method}-quantized base (QLoRA): merging is lossy, as the adapter is merged "
            f"onto the {method} base dequantized and saved in 16-bit (--dtype auto), whose outputs differ slightly "
            "from the quantized model's")


def _text_config(model: Any) -> Any:
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def untie_adapted_embeddings(peft_model: Any) -> bool:
    """Give the output embedding its own weight when LoRA adapts a tied embedding; return whether it did.

    `merge_and_unload` adds a LoRA delta into the adapted module's weight in place. When that weight
    is shared (tied input and output embeddings), the delta lands in both: a LoRA on `lm_head`
    would change the input embeddings too (and the logits), so the tie is cut first.
    """
    base = peft_model.get_base_model()
    config = _text_config(base)
    output, inputs = base.get_output_embeddings(), base.get_input_embeddings()
    if not getattr(config, "tie_word_embeddings", False) or output is None:
        return False
    if not any(hasattr(module, "lora_A") or hasattr(module, "lora_embedding_A") for module in (output, inputs)):
        return False
    import torch

    head = getattr(output, "base_layer", output)
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    config.tie_word_embeddings = False
    return True


def merge(peft_model: Any, tokenizer: "PreTrainedTokenizerBase | None" = None, uri: str = "") -> "PreTrainedModel":
    """`merge_and_unload`, with embeddings tied only where they still are, checked against the adapter model.

    A tied model whose `lm_head` was trained as a modules_to_save copy cannot stay tied: peft unties
    it on merge (`tie_word_embeddings=False`); a LoRA on a tied embedding is untied here first (see
    `untie_adapted_embeddings`). With a tokenizer, the merged model's logits on a probe prompt must
    match the adapter model's (fp32, within 1e-3 of the largest logit, at least 1e-3), so a wrong
    merge is never written.
    """
    import torch

    probe = reference = None
    if tokenizer is not None:
        probe = tokenizer(["The quick brown fox"], return_tensors="pt")
        with torch.no_grad():
            reference = peft_model(**probe).logits.float()
    untie_adapted_embeddings(peft_model)
    model = peft_model.merge_and_unload()
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    config = _text_config(model)
    if getattr(config, "tie_word_embeddings", False) and output is not None and output.weight is not inputs.weight:
        if torch.equal(output.weight, inputs.weight):
            model.tie_weights()
        else:
            config.tie_word_embeddings = False
    model.eval()
    if probe is not None:
        with torch.no_grad():
            diff = (model(**probe).logits.float() - reference).abs().max().item()
        if diff > 1e-3 * max(1.0, reference.abs().max().item()):
            raise ExportError(f"merging the adapter of {uri!r} changed the model's logits by {diff:.3g}: this adapter "
                              "cannot be merged correctly; export it with --format adapter instead")
    return model


def save_model_files(model: "PreTrainedModel", directory: Path) -> None:
    """`save_pretrained` with safetensors: config, generation config and weights."""
    model.save_pretrained(str(directory), safe_serialization=True)


def save_tokenizer(tokenizer: "PreTrainedTokenizerBase", directory: Path) -> None:
    """The tokenizer's `save_pretrained` (with its chat template, if it has one)."""
    tokenizer.save_pretrained(str(directory))


def export_merged(source: Source, target: Path, *, dtype: str = "auto", overwrite: bool = False,
                  progress: bool = True, force: bool = False) -> ExportResult:
    """Write the merged model as a plain Hugging Face folder at `target` (checked writable by the caller);
    `force`: merge a QLoRA model (see `load_source`)."""
    import torch

    torch_dtype = target_dtype(source, dtype)
    model, tokenizer, base_tied = load_source(source, force)
    model.to(getattr(torch, torch_dtype))
    record = provenance(source, "merged", torch_dtype)
    record["tie_word_embeddings"] = bool(getattr(model.config, "tie_word_embeddings", False))
    write_folder(target, [
        ("weights", lambda d: save_model_files(model, d)),
        ("tokenizer", lambda d: save_tokenizer(tokenizer, d)),
        ("record", lambda d: write_json(d / EXPORT_RECORD, record)),
    ], overwrite=overwrite, progress=progress)
    notes = [f"serve it with: vllm serve {target}"]
    if source.conf.get("quantization"):
        notes.append(f"merged onto the dequantized {source.conf['quantization']['method']} base, in {torch_dtype}")
    if base_tied and not record["tie_word_embeddings"]:
        notes.append("the base ties its input and output embeddings, but the adapter changes lm_head or the "
                     "embeddings on their own, so the merged model stores both matrices (tie_word_embeddings=false)")
    return ExportResult("merged", str(target), record, notes)
