"""What keeps vLLM (`--enable-lora --lora-modules name=DIR`) from serving an exported adapter as a LoRA.

The limits are vLLM's (`vllm.config.lora.LoRAConfig`, `vllm.lora.peft_helper.PEFTHelper._validate_features`):
no DoRA, no modules_to_save, no LoRA bias, and a rank within `--max-lora-rank` (default 16, one of
`VLLM_MAX_LORA_RANKS`). They are reported with the way around them, never refused: the adapter is
still a valid peft folder.
"""

from __future__ import annotations

from typing import Any

VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_limits(adapter_config: dict[str, Any]) -> list[str]:
    """One note per vLLM limit that this `adapter_config.json` hits, each with what to do instead."""
    notes = []
    if adapter_config.get("use_dora"):
        notes.append("vLLM does not support DoRA adapters (use_dora=true): serve --format merged instead")
    if adapter_config.get("modules_to_save"):
        notes.append(f"vLLM's LoRA loader refuses modules_to_save (recent versions accept only None, some older "
                     f"ones lm_head/embed_tokens), this adapter has {sorted(adapter_config['modules_to_save'])}: "
                     "serve --format merged instead")
    ranks = [int(adapter_config.get("r") or 0), *(int(r) for r in (adapter_config.get("rank_pattern") or {}).values())]
    rank = max(ranks)
    if rank > VLLM_DEFAULT_MAX_LORA_RANK:
        allowed = next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), None)
        if allowed is None:
            notes.append(f"rank {rank} exceeds vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]}): "
                         "serve --format merged instead")
        else:
            notes.append(f"rank {rank} exceeds vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_LORA_RANK}: start "
                         f"vLLM with --max-lora-rank {allowed}, or serve --format merged")
    if adapter_config.get("bias", "none") != "none":
        notes.append(f"vLLM does not support LoRA bias={adapter_config['bias']!r}: serve --format merged instead")
    return notes
