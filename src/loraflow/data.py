"""Training data: read and check a table, tokenize it with loss masks, and batch it.

The path from a file to batches is four flat steps, each usable on its own:

1. `load_examples`: read CSV / JSON Lines / Parquet (`read_table`) and check the columns, before
   any model is loaded. Every `DataError` starts with the parameter and the file it is about.
2. `split_examples`: a seeded train/eval split when no eval file is given.
3. `tokenize_examples`: `[bos] + prompt + completion + [eos]`, with the loss on the completion
   only (labels -100 on BOS and the prompt), or `[bos] + text + [eos]` for plain text.
4. `make_dataloader`: length-grouped dynamic padding (right padding), or packing several
   examples per row with position ids that restart at 0, so no example attends to another.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from loraflow.errors import ConfigError, DataError

if TYPE_CHECKING:
    import pandas as pd
    import torch

logger = logging.getLogger(__name__)

SAMPLE_DATA = Path(__file__).parent / "resources" / "sample.jsonl"
"""The bundled sample dataset (`prompt` + `completion`), used when no train_data is given."""

IGNORE_INDEX = -100  # label value that torch's cross-entropy (and so every HF causal LM) skips
FORMATS = {".csv": "CSV", ".jsonl": "JSON Lines", ".json": "JSON Lines", ".parquet": "Parquet"}
OVERFLOWS = ("truncate", "drop")
MEGABATCH_FACTOR = 50  # as the HF Trainer's group_by_length: sort within 50 x batch_size examples
MAX_CHARS_PER_TOKEN = 100  # no real tokenizer has longer tokens; cells beyond this are cut early
_FIRST_ROWS = 5  # how many bad row numbers an error lists
_BINARY_SNIFF = 64 * 1024


# ---------------------------------------------------------------------------------------------
# Columns.


@dataclass(frozen=True)
class Columns:
    """Which columns hold the training text: `text`, or `prompt` + `completion` (not both)."""

    text: str | None = None
    """Column of plain text; the loss is on every token."""
    prompt: str | None = None
    """Column of prompts; masked from the loss."""
    completion: str | None = None
    """Column of completions; the loss is computed on these tokens only."""

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def problems(self) -> list[str]:
        """Every problem with this choice of columns (empty when it is valid)."""
        if self.text and (self.prompt or self.completion):
            return ["give either `text_column`, or `prompt_column` + `completion_column`, not both"]
        if not self.text and not (self.prompt and self.completion):
            return [
                "give `text_column`, or both `prompt_column` and `completion_column` "
                f"(got prompt_column={self.prompt!r}, completion_column={self.completion!r})"
            ]
        return []

    @property
    def names(self) -> tuple[str, ...]:
        """The column names to read, in order."""
        return (self.text,) if self.text else (self.prompt, self.completion)  # type: ignore[return-value]

    @property
    def is_prompt_completion(self) -> bool:
        return self.text is None

    def flag_for(self, name: str) -> str:
        """The CLI flag that sets the column called `name`."""
        kind = {self.text: "text", self.prompt: "prompt", self.completion: "completion"}[name]
        return f"--{kind}-column"


# ---------------------------------------------------------------------------------------------
# Reading.


def _where(role: str, path: str | Path | None) -> str:
    """The start of every message: which parameter, and which file."""
    return f"{role} {str(path)!r}" if path is not None else role


def _short(value: object, limit: int = 60) -> str:
    """`repr` cut to `limit` characters, so a 10 MB cell never ends up in a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "...'" + f" ({len(str(value)):,} chars)"


def read_table(path: str | Path, role: str = "train_data") -> "pd.DataFrame":
    """Read a CSV, JSON Lines (`.jsonl`, `.json`) or Parquet file into a DataFrame.

    CSV cells are read as text (an empty cell is null), so `007` stays `"007"`.

    Raises:
        DataError: the file is missing, empty, binary, not UTF-8, has an unsupported extension,
            or cannot be parsed. The message names `role` and the file.
    """
    where = _where(role, path)
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if suffix not in FORMATS:
        known = ", ".join(FORMATS)
        raise DataError(f"{where}: unsupported file extension {p.suffix or '(none)'!r}; use one of {known}")
    if not p.exists():
        raise DataError(f"{where}: file not found (looked at {str(p.resolve())!r}); check the path")
    if p.is_dir():
        raise DataError(f"{where}: is a directory; pass a {', '.join(FORMATS)} file")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DataError(f"{where}: could not be read: {e.strerror or e}") from e
    if not raw.strip():
        noun = "byte" if len(raw) == 1 else "bytes"
        raise DataError(f"{where}: the file is empty ({len(raw)} {noun}, no data); add at least one example")
    if suffix == ".parquet":
        return _read_parquet(raw, where)
    text = _decode_text(raw, where, FORMATS[suffix])
    if suffix == ".csv":
        return _read_csv(text, where)
    return _read_json_lines(text, where, allow_array=suffix == ".json")


def _decode_text(raw: bytes, where: str, fmt: str) -> str:
    if b"\x00" in raw[:_BINARY_SNIFF]:
        raise DataError(f"{where}: looks like a binary file (it contains NUL bytes), not {fmt} text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{where}: is not valid UTF-8 text (byte 0x{raw[e.start]:02x} at line {line}, offset {e.start}); "
            "re-save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from e


def _read_csv(text: str, where: str) -> "pd.DataFrame":
    import pandas as pd

    try:
        # keep_default_na=False: the words "NA" or "null" are text here; only an empty cell is null.
        return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
        detail = " ".join(str(e).split())[:200]
        raise DataError(
            f"{where}: could not be parsed as CSV ({detail}); is the file truncated or not CSV?"
        ) from e


def _read_json_lines(text: str, where: str, *, allow_array: bool) -> "pd.DataFrame":
    import pandas as pd

    if allow_array and text.lstrip().startswith("["):  # a .json file holding one array of objects
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
        lines = list(enumerate(records, start=1))
    else:
        lines = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                lines.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{where}: line {number} is not valid JSON ({e.msg} at column {e.colno}): {_short(line)}; "
                    "JSON Lines needs one JSON object per line"
                ) from e
    for number, record in lines:
        if not isinstance(record, dict):
            raise DataError(
                f"{where}: record {number} is a JSON {type(record).__name__}, not an object: {_short(record)}; "
                'each record must look like {"prompt": "...", "completion": "..."}'
            )
    return pd.DataFrame([record for _, record in lines])


def _read_parquet(raw: bytes, where: str) -> "pd.DataFrame":
    import pandas as pd

    try:
        return pd.read_parquet(io.BytesIO(raw))
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError and others for a corrupt file
        detail = " ".join(str(e).split())[:200]
        raise DataError(f"{where}: is not a readable Parquet file ({type(e).__name__}: {detail})") from e


# ---------------------------------------------------------------------------------------------
# Checking.


def load_examples(path: str | Path, columns: Columns, role: str = "train_data") -> "pd.DataFrame":
    """Read a data file and check it can be trained on; return only the needed columns.

    Row numbers in messages count data rows from 1 (a CSV header is not a row).

    Returns:
        A DataFrame with `columns.names` as string columns and a fresh 0-based index. Its
        `attrs` hold `source` (the path) and `role`, which later error messages use.

    Raises:
        DataError: every problem `read_table` finds, no rows, a missing column (the message lists
            the columns that exist), null or non-string cells, empty text or completions.
    """
    frame = read_table(path, role)
    where = _where(role, path)
    if len(frame) == 0:
        raise DataError(f"{where}: has no rows (only a header or an empty table); add at least one example")
    for name in columns.names:
        if name not in frame.columns:
            existing = [_short(str(c), 40) for c in frame.columns[:20]]
            more = f" and {len(frame.columns) - 20} more" if len(frame.columns) > 20 else ""
            raise DataError(
                f"{where}: column {name!r} not found; columns are: [{', '.join(existing)}]{more}. "
                f"Pass {columns.flag_for(name)} with one of them."
            )
    for name in columns.names:
        _check_string_cells(frame[name], name, where, allow_empty=name == columns.prompt)
    selected = frame[list(columns.names)].reset_index(drop=True).astype(object)
    selected.attrs.update(source=str(path), role=role)
    return selected


def _check_string_cells(column: "pd.Series", name: str, where: str, *, allow_empty: bool) -> None:
    values = column.tolist()
    bad = [i for i, v in enumerate(values, start=1) if not isinstance(v, str)]
    if bad:
        kinds = Counter("null" if _is_null(values[i - 1]) else type(values[i - 1]).__name__ for i in bad)
        found = ", ".join(f"{kind} x{n}" for kind, n in kinds.most_common())
        raise DataError(
            f"{where}: column {name!r} has {len(bad)} null or non-string cells "
            f"(first rows: {_row_list(bad)}; found {found}); fix or remove those rows."
        )
    if not allow_empty:
        empty = [i for i, v in enumerate(values, start=1) if not v.strip()]
        if empty:
            raise DataError(
                f"{where}: column {name!r} has {len(empty)} empty cells (first rows: {_row_list(empty)}); "
                "there is nothing to learn from them: fix or remove those rows."
            )


def _is_null(value: Any) -> bool:
    import pandas as pd

    return pd.api.types.is_scalar(value) and bool(pd.isna(value))  # None, NaN, pd.NA, NaT


def _row_list(rows: list[int]) -> str:
    return ", ".join(str(r) for r in rows[:_FIRST_ROWS]) + (", ..." if len(rows) > _FIRST_ROWS else "")


def split_examples(df: "pd.DataFrame", eval_fraction: float, seed: int) -> tuple["pd.DataFrame", "pd.DataFrame"]:
    """Seeded train/eval split; eval gets round(eval_fraction * rows) rows, at least 1.

    Both parts keep the original row order and `attrs`, and get a fresh index.

    Raises:
        DataError: fewer than 2 rows, so no split leaves a row on both sides.
    """
    import numpy as np

    where = _where(df.attrs.get("role", "train_data"), df.attrs.get("source"))
    if not 0 < eval_fraction < 1:
        raise ConfigError(f"`eval_fraction` must be > 0 and < 1, got {eval_fraction}")
    if len(df) < 2:
        raise DataError(f"{where}: has {len(df)} row, too few to hold out an eval split; add rows or pass eval_data")
    n_eval = min(len(df) - 1, max(1, round(eval_fraction * len(df))))
    order = np.random.default_rng(seed).permutation(len(df))
    eval_rows, train_rows = np.sort(order[:n_eval]), np.sort(order[n_eval:])
    train, evaluation = df.iloc[train_rows].reset_index(drop=True), df.iloc[eval_rows].reset_index(drop=True)
    train.attrs, evaluation.attrs = dict(df.attrs), dict(df.attrs)
    return train, evaluation


# ---------------------------------------------------------------------------------------------
# Tokenizing.


@dataclass
class TokenizedExamples:
    """Token ids and labels per example (unpadded), and what happened to over-long rows."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    """Same length as input_ids; -100 where no loss is computed (BOS, prompt)."""
    n_truncated: int = 0
    """Rows kept, cut to their first max_seq_length tokens."""
    n_dropped: int = 0
    """Rows removed: too long with overflow=drop, or nothing left to learn after truncation."""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    @property
    def num_tokens(self) -> int:
        """Total tokens (there is no padding here)."""
        return sum(self.lengths)

    @property
    def num_label_tokens(self) -> int:
        """Tokens the loss is computed on (label != -100)."""
        return sum(sum(1 for t in labels if t != IGNORE_INDEX) for labels in self.labels)


def tokenize_examples(
    df: "pd.DataFrame",
    tokenizer: Any,
    columns: Columns,
    max_seq_length: int,
    overflow: str = "truncate",
    *,
    role: str | None = None,
    source: str | None = None,
) -> TokenizedExamples:
    """Tokenize every row into `[bos] + prompt + completion + [eos]` (or `[bos] + text + [eos]`).

    Labels are the ids with -100 on BOS and the prompt; the model shifts them internally. BOS is
    never a prediction target anyway, and masking it keeps packed rows from learning to predict
    one example's BOS from the previous example. BOS/EOS are skipped if the tokenizer has none.

    Args:
        df: rows from `load_examples` (its `attrs` name the file in messages).
        tokenizer: a Hugging Face tokenizer.
        columns: which columns to use.
        max_seq_length: longest example in tokens.
        overflow: "truncate" keeps the first max_seq_length tokens; "drop" removes the row.
            Either way a warning says how many rows were affected.
        role, source: override the parameter and file named in messages (default: df.attrs).

    Raises:
        DataError: no rows are left to train on.
        ConfigError: an unknown `overflow` or a max_seq_length below 2.
    """
    if overflow not in OVERFLOWS:
        raise ConfigError(f"`overflow` must be one of {', '.join(OVERFLOWS)}, got {overflow!r}")
    if max_seq_length < 2:
        raise ConfigError(f"`max_seq_length` must be at least 2 (BOS + one token), got {max_seq_length}")
    where = _where(role or df.attrs.get("role", "train_data"), source or df.attrs.get("source"))
    if len(df) == 0:
        raise DataError(f"{where}: has no rows to tokenize")
    char_cap = max_seq_length * MAX_CHARS_PER_TOKEN
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def encode(name: str) -> tuple[list[list[int]], list[bool]]:
        # Cut giant cells to a length that is over max_seq_length tokens for any real tokenizer,
        # so a 10 MB cell costs milliseconds, not a quadratic BPE merge over 10 MB.
        texts = [str(v) for v in df[name].tolist()]
        cut = [len(t) > char_cap for t in texts]
        ids = tokenizer([t[:char_cap] for t in texts], add_special_tokens=False)["input_ids"]
        return ids, cut

    if columns.is_prompt_completion:
        prompts, cut_p = encode(columns.prompt)  # type: ignore[arg-type]
        completions, cut_c = encode(columns.completion)  # type: ignore[arg-type]
        masked = [len(bos) + len(p) for p in prompts]
        full = [bos + p + c + eos for p, c in zip(prompts, completions)]
        cut = [a or b for a, b in zip(cut_p, cut_c)]
    else:
        texts, cut = encode(columns.text)  # type: ignore[arg-type]
        masked = [len(bos)] * len(texts)
        full = [bos + t + eos for t in texts]

    input_ids: list[list[int]] = []
    labels: list[list[int]] = []
    too_long, truncated, unlearnable = 0, 0, 0
    for ids, n_masked, was_cut in zip(full, masked, cut):
        long = len(ids) > max_seq_length or was_cut
        if long:
            too_long += 1
            if overflow == "drop":
                continue
            ids = ids[:max_seq_length]
        if n_masked >= len(ids):  # truncation left no completion token to learn from
            unlearnable += 1
            continue
        truncated += long
        input_ids.append(ids)
        labels.append([IGNORE_INDEX] * n_masked + ids[n_masked:])

    n_truncated = truncated
    n_dropped = len(full) - len(input_ids)
    longest = max(len(ids) for ids in full)
    if too_long:
        action = (
            f"truncated them to their first {max_seq_length} tokens"
            if overflow == "truncate"
            else "dropped them"
        )
        lost = f"; {unlearnable} of them kept no completion token and were dropped" if unlearnable else ""
        logger.warning(
            "%s: %d of %d rows are longer than max_seq_length=%d tokens (longest: %s); %s%s. "
            "Raise --max-seq-length to keep them whole.",
            where, too_long, len(full), max_seq_length, f"{longest:,}" + ("+" if any(cut) else ""), action, lost,
        )
    if not input_ids:
        shortest = min(len(ids) for ids in full)
        raise DataError(
            f"{where}: every one of the {len(full)} rows was dropped: they are longer than "
            f"max_seq_length={max_seq_length} tokens (shortest: {shortest}) with overflow={overflow}"
            + (", or their prompt fills the whole max_seq_length" if unlearnable else "")
            + f"; raise --max-seq-length to at least {shortest}."
        )
    return TokenizedExamples(input_ids, labels, n_truncated=n_truncated, n_dropped=n_dropped)


def describe(data: "TokenizedExamples | pd.DataFrame") -> dict[str, float]:
    """A short summary for logs: rows, and for tokenized data the token counts and lengths."""
    if not isinstance(data, TokenizedExamples):
        return {"rows": len(data)}
    lengths = data.lengths
    return {
        "rows": len(data),
        "tokens": data.num_tokens,
        "label_tokens": data.num_label_tokens,
        "max_length": max(lengths, default=0),
        "mean_length": sum(lengths) / len(lengths) if lengths else 0.0,
        "truncated": data.n_truncated,
        "dropped": data.n_dropped,
    }


# ---------------------------------------------------------------------------------------------
# Batching.


def length_grouped_batches(lengths: list[int], batch_size: int, rng: Any) -> list[list[int]]:
    """Batches of indices with similar lengths, in random order (as HF Trainer's group_by_length).

    Shuffle all indices, cut them into mega-batches of 50 x batch_size, sort each by length
    (longest first), cut that into batches, then shuffle the order of the batches. Only the last
    batch can be smaller than batch_size.
    """
    order = rng.permutation(len(lengths)).tolist()
    mega = batch_size * MEGABATCH_FACTOR
    ordered = [i for s in range(0, len(order), mega) for i in sorted(order[s : s + mega], key=lambda i: -lengths[i])]
    batches = [ordered[s : s + batch_size] for s in range(0, len(ordered), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches)).tolist()]


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

        # Plan global batches (batch_size x replicas) and give each replica one part of each, so N
        # processes x B see the same examples per optimizer step as 1 process x N*B.
        size = self.batch_size * self.num_replicas
        if self.shuffle:
            batches = length_grouped_batches(self.lengths, size, np.random.default_rng([self.seed, epoch]))
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
    """Right-pad a batch to its longest example: pad ids, attention_mask 0, labels -100."""
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
