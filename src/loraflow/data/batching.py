"""Batching tokenized examples: length-grouped padded batches or packed rows, sharded across processes.

- `length_grouped_batches`: transformers' `get_length_grouped_indices` (the Trainer's
  `group_by_length`: sort within mega-batches of 50 x batch_size), cut into batches whose order is
  then shuffled, so little padding is computed and batches do not run longest to shortest.
- packing: several whole examples per row, with position ids that restart at 0, so no example
  attends to another (`collate_packed`).
- sharding: every process gets its own disjoint part of every global batch, and together they
  cover every example exactly once (`EpochBatchSampler`).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, Iterator

from loraflow.data.tables import IGNORE_INDEX
from loraflow.data.tokenize import TokenizedExamples
from loraflow.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

MEGABATCH_FACTOR = 50  # as the HF Trainer's group_by_length: sort within 50 x batch_size examples


def length_grouped_batches(lengths: list[int], batch_size: int, generator: "torch.Generator") -> list[list[int]]:
    """Batches of indices with similar lengths, in random order (as HF Trainer's group_by_length).

    transformers' `get_length_grouped_indices` shuffles all indices, cuts them into mega-batches of
    50 x batch_size and sorts each by length (longest first); the result is cut into batches, and
    the order of the batches is shuffled (the Trainer keeps it, so its batches shrink within each
    mega-batch). Only the last batch can be smaller than batch_size.
    """
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    ordered = get_length_grouped_indices(lengths, batch_size, mega_batch_mult=MEGABATCH_FACTOR, generator=generator)
    batches = [ordered[s : s + batch_size] for s in range(0, len(ordered), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def pack_examples(lengths: list[int], max_seq_length: int, order: list[int]) -> list[list[int]]:
    """Greedily fill rows of at most max_seq_length tokens with examples, taken in `order`."""
    rows: list[list[int]] = []
    used = max_seq_length + 1
    for i in order:
        if used + lengths[i] > max_seq_length:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += lengths[i]
    return rows


def _mergeable(batches: list[list[int]], parts: int) -> list[list[int]]:
    """Merge any batch too small to split into `parts` into the smallest other one."""
    if sum(map(len, batches)) < parts:
        raise DataError(
            f"only {sum(map(len, batches))} examples (or packed rows) for {parts} processes; "
            "each process needs at least one: add data or use fewer processes"
        )
    batches = [list(b) for b in batches]
    while len(batches) > 1 and min(map(len, batches)) < parts:
        rest = batches.pop(min(range(len(batches)), key=lambda k: len(batches[k])))
        batches[min(range(len(batches)), key=lambda k: len(batches[k]))] += rest
    return batches


def _split(batch: list[int], parts: int) -> list[list[int]]:
    """Contiguous parts of (nearly) equal size, none empty."""
    bounds = [round(i * len(batch) / parts) for i in range(parts + 1)]
    return [batch[bounds[i] : bounds[i + 1]] for i in range(parts)]


class EpochBatchSampler:
    """Yields one replica's batches of indices; reshuffled, deterministically, on every epoch.

    Not accelerate's `BatchSamplerShard`: with `even_batches` it repeats examples to fill the last
    batch of every process, and without it drops them; either way a 2-process eval loss would not
    equal the 1-process one (tests/test_multiprocess.py checks that it does). Here every example is
    seen exactly once, whatever the number of processes.

    Each `iter()` is a new epoch (`set_epoch` sets which one, as for DistributedSampler), and
    epoch e always gives the same batches for the same seed. Every replica plans all batches from
    the same seed, then takes every num_replicas-th one, so replicas never overlap.
    """

    def __init__(self, lengths: list[int], batch_size: int, *, shuffle: bool, seed: int,
                 num_replicas: int = 1, rank: int = 0):
        self.lengths, self.batch_size, self.shuffle, self.seed = lengths, batch_size, shuffle, seed
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        self._count = len(self.plan(0)) // num_replicas  # the same on every epoch

    def plan(self, epoch: int) -> list[list[int]]:
        """All replicas' batches for `epoch`, before sharding."""
        import numpy as np
        import torch

        # Plan global batches (batch_size x replicas) and give each replica one part of each, so N
        # processes x B see the same examples per optimizer step as 1 process x N*B.
        size = self.batch_size * self.num_replicas
        if self.shuffle:
            generator = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
            batches = length_grouped_batches(self.lengths, size, generator)
        else:  # evaluation: keep the file's order
            n = len(self.lengths)
            batches = [list(range(s, min(s + size, n))) for s in range(0, n, size)]
        parts = self.num_replicas
        return [part for batch in _mergeable(batches, parts) for part in _split(batch, parts)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.plan(self.epoch)[self.rank :: self.num_replicas]
        self.epoch += 1
        return iter(batches)

    def __len__(self) -> int:
        return self._count




def _pad(rows: list[list[int]], value: int, width: int) -> list[list[int]]:
    return [row + [value] * (width - len(row)) for row in rows]


def collate_padded(items: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, "torch.Tensor"]:
    """Right-pad a batch to its longest example: pad ids, attention_mask 0, labels -100.

    transformers' `DataCollatorForSeq2Seq` gives the same tensors as fast but pads on the
    tokenizer's `padding_side`, which loraflow's
    tokenizers set to left for generation; training needs right padding (Llama numbers positions
    from the left, so left padding would shift them), and this needs no tokenizer at all.
    """
    import torch

    width = max(len(ids) for ids, _ in items)
    ids = [ids for ids, _ in items]
    return {
        "input_ids": torch.tensor(_pad(ids, pad_token_id, width)),
        "attention_mask": torch.tensor(_pad([[1] * len(r) for r in ids], 0, width)),
        "labels": torch.tensor(_pad([labels for _, labels in items], IGNORE_INDEX, width)),
    }


def collate_packed(rows: list[list[tuple[list[int], list[int]]]], pad_token_id: int) -> dict[str, Any]:
    """Concatenate each row's examples, with position ids restarting at 0 for every example.

    How this keeps examples apart, in transformers 5.x (masking_utils._preprocess_mask_arguments,
    find_packed_sequence_indices): when `attention_mask` is None and there is no cache, a drop in
    `position_ids` starts a new sequence, and the causal mask becomes block-diagonal per row.
    That works for any batch size with sdpa, eager and flex attention, and flash-attention reads
    the same position ids. It needs `use_cache=False`: Llama's config has use_cache=True, which
    makes the model create an empty cache, skip the detection and attend across examples even
    in train mode, so the batch carries `use_cache: False` for `model(**batch)`.

    Each example's first label is set to -100 so the last token of one example is never trained
    to predict the first token of the next. The padding at the end of a row is its own segment
    (positions from 0), labelled -100.
    """
    import torch

    ids, labels, positions = [], [], []
    for row in rows:
        ids.append([t for example, _ in row for t in example])
        labels.append([t for _, lab in row for t in [IGNORE_INDEX] + lab[1:]])
        positions.append([p for example, _ in row for p in range(len(example))])
    width = max(len(r) for r in ids)
    positions = [p + list(range(width - len(p))) for p in positions]
    return {
        "input_ids": torch.tensor(_pad(ids, pad_token_id, width)),
        "labels": torch.tensor(_pad(labels, IGNORE_INDEX, width)),
        "position_ids": torch.tensor(positions),
        "use_cache": False,
    }


def split_batch(batch: dict[str, Any], max_tokens: int) -> list[dict[str, Any]]:
    """Cut a collated batch into row ranges of at most `max_tokens` padded tokens each.

    Rows are taken in order (length-grouped batches come longest first), each part holds at least
    one row, and a padded part is trimmed to its own longest row, so splitting also drops padding.
    Non-tensor entries (`use_cache`) are kept as they are in every part.
    """
    import torch

    rows = batch["input_ids"].shape[0]
    mask = batch.get("attention_mask")
    lengths = mask.sum(dim=1).tolist() if mask is not None else [batch["input_ids"].shape[1]] * rows
    parts, start = [], 0
    while start < rows:
        end, width = start + 1, lengths[start]
        while end < rows and (end + 1 - start) * max(width, lengths[end]) <= max_tokens:
            width = max(width, lengths[end])
            end += 1
        parts.append((start, end, int(width)))
        start = end
    if len(parts) == 1:
        return [batch]
    return [
        {k: (v[s:e, :w] if mask is not None else v[s:e]) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        for s, e, w in parts
    ]


def make_dataloader(
    data: TokenizedExamples,
    batch_size: int,
    *,
    pad_token_id: int,
    shuffle: bool,
    seed: int,
    packing: bool = False,
    max_seq_length: int | None = None,
    num_replicas: int = 1,
    rank: int = 0,
) -> "torch.utils.data.DataLoader":
    """A DataLoader of right-padded, length-grouped batches, or of packed rows.

    Without packing, a batch is `batch_size` examples of similar length padded to the longest
    (`input_ids`, `attention_mask`, `labels`). With packing, a batch is `batch_size` rows of up
    to `max_seq_length` tokens, each several whole examples (`input_ids`, `labels`,
    `position_ids`, `use_cache=False`, no attention_mask; see `collate_packed`). Examples are
    packed once, from a seeded shuffle, so the number of batches never changes between epochs.

    Args:
        data: tokenized examples.
        batch_size: examples (or packed rows) per batch.
        pad_token_id: id written into padding (masked everywhere).
        shuffle: length-grouped random batches, new each epoch (training); else file order.
        seed: makes the batches of every epoch reproducible.
        packing: pack examples into rows instead of padding each one.
        max_seq_length: row length for packing (required with packing).
        num_replicas, rank: shard batches across processes; every rank gets the same number of
            disjoint batches and together they cover every example once.

    Raises:
        ConfigError: a bad batch_size, rank, or packing without max_seq_length.
        DataError: fewer examples than processes.
    """
    from torch.utils.data import DataLoader

    problems = []
    if batch_size < 1:
        problems.append(f"`batch_size` must be a positive integer, got {batch_size}")
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        problems.append(f"`rank` must be in [0, num_replicas={num_replicas}), got {rank}")
    if packing and (max_seq_length is None or max_seq_length < max(data.lengths, default=0)):
        problems.append(
            f"packing needs `max_seq_length` >= the longest example ({max(data.lengths, default=0)}), "
            f"got {max_seq_length}; pass the max_seq_length the data was tokenized with"
        )
    if problems:
        raise ConfigError(problems)
    examples = list(zip(data.input_ids, data.labels))
    if packing:
        import numpy as np

        order = list(range(len(examples)))
        if shuffle:
            order = np.random.default_rng(seed).permutation(len(examples)).tolist()
        rows = pack_examples(data.lengths, max_seq_length, order)  # type: ignore[arg-type]
        items: list[Any] = [[examples[i] for i in row] for row in rows]
        lengths = [sum(data.lengths[i] for i in row) for row in rows]
        collate = partial(collate_packed, pad_token_id=pad_token_id)
    else:
        items, lengths = examples, data.lengths
        collate = partial(collate_padded, pad_token_id=pad_token_id)
    sampler = EpochBatchSampler(lengths, batch_size, shuffle=shuffle, seed=seed, num_replicas=num_replicas, rank=rank)
    # A private generator: creating an iterator then draws no number from torch's global RNG,
    # which dropout uses, so a run resumed mid-epoch sees the same random stream as one never stopped.
    import torch

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(items, batch_sampler=sampler, collate_fn=collate, generator=generator)
