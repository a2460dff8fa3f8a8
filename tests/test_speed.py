"""Speed tricks behind one door (loraflow.speed): each one switchable, each equal to the plain path."""

from __future__ import annotations

import pytest
import torch

from loraflow import speed


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _loss_and_grads(peft_model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    peft_model.zero_grad(set_to_none=True)
    loss = speed.causal_lm_loss(peft_model, batch)
    loss.backward()
    return loss.detach(), _grads(peft_model)


def _chat_like_rows(tokenizer) -> list[tuple[list[int], list[int]]]:
    """Rows whose labels cover only their second half, as a prompt + reply would."""
    rows = []
    for text in ["a prompt then a reply to learn", "short one here", "the longest example of the three rows given"]:
        ids = tokenizer(text)["input_ids"]
        half = len(ids) // 2
        rows.append((ids, [-100] * half + ids[half:]))
    return rows


@pytest.mark.parametrize("packing", [False, True])
def test_the_head_at_labels_gives_the_loss_and_gradients_of_the_plain_path(model, tiny_tokenizer, monkeypatch, packing):
    from loraflow import data as data_lib
    from loraflow.config import lora_settings
    from loraflow.lora import apply_lora

    peft_model = apply_lora(model, lora_settings({"r": 4, "lora_dropout": 0.0})).train()
    rows = _chat_like_rows(tiny_tokenizer)
    if packing:
        batch = data_lib.collate_packed([rows[:2], rows[2:]], tiny_tokenizer.pad_token_id)
    else:
        batch = data_lib.collate_padded(rows, tiny_tokenizer.pad_token_id)
    assert (batch["labels"][:, 1:] == -100).all(dim=0).any()  # some columns predict no label: the trick has work to skip

    fast_loss, fast_grads = _loss_and_grads(peft_model, batch)
    monkeypatch.setenv(speed.ENV, "head_at_labels")
    plain_loss, plain_grads = _loss_and_grads(peft_model, batch)

    assert torch.isfinite(plain_loss)
    torch.testing.assert_close(fast_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert fast_grads.keys() == plain_grads.keys() and fast_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_head_at_labels_computes_logits_only_where_a_label_is_predicted(model, tiny_tokenizer):
    from loraflow import data as data_lib

    rows = _chat_like_rows(tiny_tokenizer)
    batch = data_lib.collate_padded(rows, tiny_tokenizer.pad_token_id)
    shapes = []
    handle = model.lm_head.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
    try:
        speed.causal_lm_loss(model, batch)
    finally:
        handle.remove()
    predicting = int((batch["labels"][:, 1:] != -100).sum())
    assert shapes == [(predicting, model.config.vocab_size)] and predicting < batch["input_ids"].numel() / 2
    assert not model.lm_head._forward_pre_hooks  # the pick is removed after the pass


class _NoHead(torch.nn.Module):
    """A model with no output embeddings to hook: the plain path."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def get_output_embeddings(self):
        return None

    def forward(self, **kwargs):
        self.calls.append(kwargs)
        return type("Out", (), {"loss": torch.tensor(1.5)})()


def test_a_model_without_output_embeddings_takes_the_plain_path():
    model = _NoHead()
    batch = {"input_ids": torch.ones(1, 3, dtype=torch.long), "labels": torch.ones(1, 3, dtype=torch.long),
             "use_cache": False}  # a packed batch carries use_cache itself
    assert speed.causal_lm_loss(model, batch).item() == 1.5
    assert [sorted(c) for c in model.calls] == [["input_ids", "labels", "use_cache"]] and model.calls[0]["use_cache"] is False


def test_a_model_that_reshapes_its_logits_gets_the_plain_loss(model, tiny_tokenizer, monkeypatch):
    from loraflow import data as data_lib

    batch = data_lib.collate_padded(_chat_like_rows(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    expected = model(**batch).loss
    real_forward = model.forward

    def reshaping(**kwargs):
        out = real_forward(**kwargs)
        out.logits = out.logits.reshape(1, -1, out.logits.shape[-1])
        return out

    monkeypatch.setattr(model, "forward", reshaping)
    torch.testing.assert_close(speed.causal_lm_loss(model, batch), expected)


def test_switches_are_read_from_the_environment(monkeypatch):
    monkeypatch.delenv(speed.ENV, raising=False)
    assert all(speed.enabled(name) for name in speed.TRICKS)
    monkeypatch.setenv(speed.ENV, " cpu_dropout , head_at_label")
    assert not speed.enabled("cpu_dropout") and speed.enabled("head_at_labels")
    assert speed.unknown_names() == ["head_at_label"]
    monkeypatch.setenv(speed.ENV, "all")
    assert not any(speed.enabled(name) for name in speed.TRICKS) and speed.unknown_names() == []
    with pytest.raises(KeyError, match="known: head_at_labels"):
        speed.enabled("no_such_trick")


def test_cpu_micro_batches_switch_off(monkeypatch):
    from loraflow.train import CPU_MICRO_BATCH_TOKENS, micro_batch_budget

    assert micro_batch_budget(0, torch.device("cpu")) == CPU_MICRO_BATCH_TOKENS
    monkeypatch.setenv(speed.ENV, "cpu_micro_batches")
    assert micro_batch_budget(0, torch.device("cpu")) is None
    assert micro_batch_budget(300, torch.device("cpu")) == 300  # a setting is not a trick: it still holds


def _train_two_steps(model, tokenizer, tmp_path, dropout: float, packing: bool = False) -> tuple[float, float, list]:
    from accelerate import Accelerator

    from loraflow import data as data_lib
    from loraflow import tracking
    from loraflow.config import TrainSettings, lora_settings
    from loraflow.lora import apply_lora
    from loraflow.train import FineTune

    torch.manual_seed(0)
    peft_model = apply_lora(model, lora_settings({"r": 4, "lora_dropout": dropout}))
    rows = _chat_like_rows(tokenizer) * 3
    examples = data_lib.TokenizedExamples([r for r, _ in rows], [lab for _, lab in rows])
    settings = TrainSettings.from_flat(max_steps=2, batch_size=4, micro_batch_tokens=0, eval_steps=10**6, seed=0,
                                       output_dir=str(tmp_path), eval_samples=0, packing=packing, max_seq_length=64)
    recipe = FineTune(settings)
    recipe.setup(Accelerator(cpu=True), tracking.RunLogger(None, enabled=False), peft_model, tokenizer, examples, examples)
    before, after, history = recipe.train()
    return before, after, history["train_loss"]


@pytest.mark.parametrize("packing", [False, True])
def test_a_run_with_every_trick_off_equals_a_run_with_every_trick_on(base_model, tiny_tokenizer, tmp_path, monkeypatch,
                                                                     packing):
    import copy

    fast = _train_two_steps(copy.deepcopy(base_model), tiny_tokenizer, tmp_path / "on", 0.0, packing)
    monkeypatch.setenv(speed.ENV, "all")
    plain = _train_two_steps(copy.deepcopy(base_model), tiny_tokenizer, tmp_path / "off", 0.0, packing)

    assert len(fast[2]) == 2 and [step for step, _ in fast[2]] == [step for step, _ in plain[2]]
    assert fast[0] == pytest.approx(plain[0], rel=1e-5) and fast[1] == pytest.approx(plain[1], rel=1e-4)
    for (_, a), (_, b) in zip(fast[2], plain[2]):
        assert a == pytest.approx(b, rel=1e-4)


def test_cpu_dropout_is_swapped_in_only_while_its_switch_is_on(base_model, tiny_tokenizer, tmp_path, monkeypatch):
    import copy

    from loraflow import dropout

    swaps = []
    original = dropout.on_cpu

    def counting(model):
        swaps.append(model)
        return original(model)

    monkeypatch.setattr(dropout, "on_cpu", counting)
    _train_two_steps(copy.deepcopy(base_model), tiny_tokenizer, tmp_path / "on", dropout=0.1)
    assert len(swaps) == 1
    monkeypatch.setenv(speed.ENV, "cpu_dropout")
    _, after, history = _train_two_steps(copy.deepcopy(base_model), tiny_tokenizer, tmp_path / "off", dropout=0.1)
    assert len(swaps) == 1 and len(history) == 2 and after == after  # peft's own dropout trained, no NaN


def test_every_trick_and_the_switch_are_documented():
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "devices.md").read_text()
    assert speed.ENV in page
    for name in speed.TRICKS:
        assert f"| `{name}` |" in page, name


def test_a_head_call_of_another_shape_passes_through_the_pick(model, tiny_tokenizer, monkeypatch):
    from loraflow import data as data_lib

    batch = data_lib.collate_padded(_chat_like_rows(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    expected = model(**batch).loss
    real_forward, probes = model.forward, []

    def probing(**kwargs):  # a model that also runs its head on something else first
        probes.append(model.lm_head(torch.zeros(1, 1, model.config.hidden_size)).shape)
        return real_forward(**kwargs)

    monkeypatch.setattr(model, "forward", probing)
    torch.testing.assert_close(speed.causal_lm_loss(model, batch), expected)
    assert probes == [torch.Size([1, 1, model.config.vocab_size])]
