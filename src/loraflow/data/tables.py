"""Training data as tables: read a file, check it can be trained on, split it, and carry where it came from.

`load_training_data(data, seed)` is the one place a training run reads its data: the train file once
(and an eval file, if one is given), checked before any model is loaded. It returns a small typed
value, `TrainingData`, whose `Table`s carry each frame with the parameter and file it came from, so
every later message and the MLflow dataset record name the right file. Every `DataError` starts
with the parameter and the file it is about.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from loraflow.config import column_problems
from loraflow.errors import ConfigError, DataError, row_list
from loraflow.flavor.layout import BUILTIN_PREFIX, short

if TYPE_CHECKING:
    import pandas as pd

    from loraflow.config import DataSettings

RESOURCES = Path(__file__).resolve().parents[1] / "resources"
SAMPLE_DATA = RESOURCES / "sample.jsonl"
"""The bundled sample dataset (`prompt` + `completion`, `builtin:qa`), used when no train_data is given."""
BUILTIN_DATA = {"qa": SAMPLE_DATA, "chat": RESOURCES / "chat.jsonl"}
"""The bundled datasets, written for this project (`scripts/make_sample_data.py`), by `builtin:` name."""
CHAT_COLUMN = "messages"
IGNORE_INDEX = -100  # the label value torch's cross-entropy (and so every HF causal LM) skips: the loss mask

FORMATS = {".csv": "CSV", ".jsonl": "JSON Lines", ".json": "JSON Lines", ".parquet": "Parquet"}
_BINARY_SNIFF = 64 * 1024


# ---------------------------------------------------------------------------------------------
# Columns.


@dataclass(frozen=True)
class Columns:
    """Which columns hold the training text: `messages`, or `text`, or `prompt` + `completion`."""

    text: str | None = None
    """Column of plain text; the loss is on every token."""
    prompt: str | None = None
    """Column of prompts; masked from the loss."""
    completion: str | None = None
    """Column of completions; the loss is computed on these tokens only."""
    messages: str | None = None
    """Column of conversations (OpenAI `messages`); the loss falls where `train_on` says."""

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def problems(self) -> list[str]:
        """Every problem with this choice of columns (empty when it is valid): `config`'s rule."""
        if self.messages:
            return [] if not (self.text or self.prompt or self.completion) else [
                "give either `messages_column` (conversations), or `text_column`, or `prompt_column` + "
                "`completion_column`, not several"]
        problems = column_problems(self.text, self.prompt, self.completion, resolved=True)
        got = f" (got prompt_column={self.prompt!r}, completion_column={self.completion!r})"
        return [p + got if "prompt_column" in p and not self.text else p for p in problems]

    @property
    def names(self) -> tuple[str, ...]:
        """The column names to read, in order."""
        if self.messages:
            return (self.messages,)
        return (self.text,) if self.text else (self.prompt, self.completion)  # type: ignore[return-value]

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    @property
    def is_prompt_completion(self) -> bool:
        return self.text is None and self.messages is None

    def flag_for(self, name: str) -> str:
        """The CLI flag that sets the column called `name`."""
        kind = {self.text: "text", self.prompt: "prompt", self.completion: "completion", self.messages: "messages"}[name]
        return f"--{kind}-column"


def columns_of(settings: "DataSettings", available: Sequence[str] = ()) -> Columns:
    """The columns a training run reads: `messages_column`, `text_column`, or `prompt_column` +
    `completion_column`; with none named, `messages` when the data (`available`) has that column
    and no `prompt` one, else `prompt` + `completion`."""
    if settings.messages_column:
        return Columns(messages=settings.messages_column)
    if settings.text_column:
        return Columns(text=settings.text_column)
    named = settings.prompt_column or settings.completion_column
    if not named and CHAT_COLUMN in available and "prompt" not in available:
        return Columns(messages=CHAT_COLUMN)
    return Columns(prompt=settings.prompt_column or "prompt", completion=settings.completion_column or "completion")


def resolve_data(value: str | Path | None) -> str:
    """A data file from a setting: a path, or a bundled sample (`builtin:qa`, the default; `builtin:chat`)."""
    if value is None or str(value) == "":
        return str(SAMPLE_DATA)
    text = str(value)
    if text.startswith(BUILTIN_PREFIX):
        name = text.removeprefix(BUILTIN_PREFIX)
        if name not in BUILTIN_DATA:
            known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_DATA)
            raise DataError(f"train_data {text!r} is not a bundled dataset; known: {known}, or pass a file")
        return str(BUILTIN_DATA[name])
    return text


# ---------------------------------------------------------------------------------------------
# What a training run reads.


@dataclass(frozen=True)
class Table:
    """Rows to train or evaluate on, with the parameter and the file they came from."""

    frame: "pd.DataFrame"
    """The needed columns only, as strings, with a fresh 0-based index."""
    role: str
    """The parameter that named the file: `train_data` or `eval_data` (for messages)."""
    source: str
    """The file the rows were read from."""
    split: str | None = None
    """How the rows were taken from `source`, when not all of it: e.g. `seeded split ...`."""

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def where(self) -> str:
        """The start of every message about these rows: the parameter and the file."""
        return _where(self.role, self.source)


@dataclass(frozen=True)
class TrainingData:
    """The train and eval tables of a run, checked, and the columns they hold."""

    train: Table
    eval: Table
    columns: Columns


def load_training_data(settings: "DataSettings", seed: int) -> TrainingData:
    """Read and check the train (and eval) data of a run: each file is read once, here.

    Without `eval_data`, a `seed`ed `eval_fraction` of `train_data` is held out for evaluation.

    Raises:
        DataError: a file that cannot be trained on (see `load_examples`), or too few rows to split.
    """
    path = resolve_data(settings.train_data)
    frame = read_table(path, "train_data")
    columns = columns_of(settings, [str(c) for c in frame.columns])
    train = check_examples(frame, path, columns, "train_data", settings.train_on)
    if settings.eval_data:
        eval_path = resolve_data(settings.eval_data)
        evaluation = check_examples(read_table(eval_path, "eval_data"), eval_path, columns, "eval_data", settings.train_on)
        return TrainingData(train, evaluation, columns)
    train_part, eval_part = split_examples(train, settings.eval_fraction, seed)
    return TrainingData(train_part, eval_part, columns)


# ---------------------------------------------------------------------------------------------
# Reading.


def _where(role: str, path: str | Path | None) -> str:
    """The start of every message: which parameter, and which file."""
    return f"{role} {str(path)!r}" if path is not None else role




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
                    f"{where}: line {number} is not valid JSON ({e.msg} at column {e.colno}): {short(line)}; "
                    "JSON Lines needs one JSON object per line"
                ) from e
    for number, record in lines:
        if not isinstance(record, dict):
            raise DataError(
                f"{where}: record {number} is a JSON {type(record).__name__}, not an object: {short(record)}; "
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


def load_examples(path: str | Path, columns: Columns, role: str = "train_data", train_on: str = "assistant") -> Table:
    """Read a data file and check it can be trained on; keep only the needed columns.

    Row numbers in messages count data rows from 1 (a CSV header is not a row).

    Returns:
        A `Table` of `columns.names` (fresh 0-based index), with `role` and `path`: string
        columns, or for conversations a column of lists of message dicts.

    Raises:
        DataError: every problem `read_table` finds, no rows, a missing column (the message lists
            the columns that exist), null or non-string cells, empty text or completions, or
            conversations that are not valid (`loraflow.data.chat.check_conversations`).
    """
    return check_examples(read_table(path, role), path, columns, role, train_on)


def check_examples(frame: "pd.DataFrame", path: str | Path, columns: Columns, role: str,
                   train_on: str = "assistant") -> Table:
    """`load_examples` on a table already read (a run reads each file once)."""
    where = _where(role, path)
    if len(frame) == 0:
        raise DataError(f"{where}: has no rows (only a header or an empty table); add at least one example")
    for name in columns.names:
        if name not in frame.columns:
            existing = [short(str(c), 40) for c in frame.columns[:20]]
            more = f" and {len(frame.columns) - 20} more" if len(frame.columns) > 20 else ""
            raise DataError(
                f"{where}: column {name!r} not found; columns are: [{', '.join(existing)}]{more}. "
                f"Pass {columns.flag_for(name)} with one of them."
            )
    if columns.is_chat:
        return _check_conversation_column(frame, path, columns.messages, role, train_on)  # type: ignore[arg-type]
    for name in columns.names:
        _check_string_cells(frame[name], name, where, allow_empty=name == columns.prompt)
    selected = frame[list(columns.names)].reset_index(drop=True).astype(object)
    return Table(selected, role=role, source=str(path))


def _check_conversation_column(frame: "pd.DataFrame", path: str | Path, name: str, role: str, train_on: str) -> Table:
    import pandas as pd

    from loraflow.data.conversations import as_conversation, check_conversations

    values = frame[name].tolist()
    keep = check_conversations(values, _where(role, path), train_on)
    conversations = pd.DataFrame({name: pd.Series([as_conversation(values[i]) for i in keep], dtype=object)})
    return Table(conversations, role=role, source=str(path))


def _check_string_cells(column: "pd.Series", name: str, where: str, *, allow_empty: bool) -> None:
    values = column.tolist()
    bad = [i for i, v in enumerate(values, start=1) if not isinstance(v, str)]
    if bad:
        kinds = Counter("null" if _is_null(values[i - 1]) else type(values[i - 1]).__name__ for i in bad)
        found = ", ".join(f"{kind} x{n}" for kind, n in kinds.most_common())
        raise DataError(
            f"{where}: column {name!r} has {len(bad)} null or non-string cells "
            f"(first rows: {row_list(bad)}; found {found}); fix or remove those rows."
        )
    if not allow_empty:
        empty = [i for i, v in enumerate(values, start=1) if not v.strip()]
        if empty:
            raise DataError(
                f"{where}: column {name!r} has {len(empty)} empty cells (first rows: {row_list(empty)}); "
                "there is nothing to learn from them: fix or remove those rows."
            )


def _is_null(value: Any) -> bool:
    import pandas as pd

    return pd.api.types.is_scalar(value) and bool(pd.isna(value))  # None, NaN, pd.NA, NaT




def split_examples(table: Table, eval_fraction: float, seed: int) -> tuple[Table, Table]:
    """Seeded train/eval split; eval gets round(eval_fraction * rows) rows, at least 1.

    Both parts keep the original row order and the table's source, and get a fresh index.

    Raises:
        DataError: fewer than 2 rows, so no split leaves a row on both sides.
    """
    import numpy as np

    if not 0 < eval_fraction < 1:
        raise ConfigError(f"`eval_fraction` must be > 0 and < 1, got {eval_fraction}")
    df = table.frame
    if len(df) < 2:
        raise DataError(f"{table.where}: has {len(df)} row, too few to hold out an eval split; add rows or pass eval_data")
    n_eval = min(len(df) - 1, max(1, round(eval_fraction * len(df))))
    order = np.random.default_rng(seed).permutation(len(df))
    eval_rows, train_rows = np.sort(order[:n_eval]), np.sort(order[n_eval:])
    split = f"seeded split, eval_fraction={eval_fraction}, seed={seed}"
    return (replace(table, frame=df.iloc[train_rows].reset_index(drop=True), split=f"{split}: train part"),
            replace(table, frame=df.iloc[eval_rows].reset_index(drop=True), split=f"{split}: eval part"))
