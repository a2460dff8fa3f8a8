"""Batch inference with a logged loraflow model: a table of prompts in, the same table plus `text` out.

Two engines run the same pyfunc model, so their outputs are equal:

- in-process: `mlflow.pyfunc.load_model(uri).predict(frame, params)`, chunk by chunk;
- Spark: `mlflow.pyfunc.spark_udf(spark, uri, result_type="string")`, which loads the model once
  per Python worker and predicts each partition's prompts there.

`predict_table` reads and writes files (the `loraflow batch-predict` command). Nothing it does loses
a user's data: the output and the model are checked before the model loads (`check_output`,
`check_model_uri`), an existing file is never replaced without `overwrite`, an existing column never
at all, and the output is written to a temporary file beside the target, then renamed. In-process,
each chunk of `CHUNK_ROWS` finished rows is kept at once in `<output>.partial/` (one file per chunk,
each written atomically), so an interrupted job (Ctrl-C, SIGTERM) keeps its finished rows and
`resume=True` completes it. For tables too big for one machine's memory, `spark_predictions` adds
the column to a Spark DataFrame you read and write with Spark yourself.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from loraflow import data as data_lib
from loraflow.errors import ConfigError, DataError
from loraflow.flavor.files import atomic_file
from loraflow.flavor.layout import MAX_SEED
from loraflow.model_uri import check_model_uri, check_task
from loraflow.signals import stop_signals

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

OUTPUT_COLUMN = "text"
OUTPUT_FORMATS = (".parquet", ".csv", ".jsonl")
CHUNK_ROWS = 64  # rows predicted, then kept on disk, at a time
MAX_NEW_TOKENS = 4096  # the pyfunc model's default cap (`max_new_tokens_cap`)


class PredictionInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped `predict_table`; the finished rows are kept in `partial`."""

    def __init__(self, signal_name: str, partial: Path, done: int, total: int):
        self.signal_name, self.partial, self.done, self.total = signal_name, partial, done, total
        super().__init__(
            f"interrupted by {signal_name}: {done} of {total} rows are done and kept in {str(partial)!r}; "
            "run the same command with --resume to complete the output"
        )


def partial_dir(output_path: str | Path) -> Path:
    """Where an in-process job keeps its finished chunks until the output is complete."""
    output_path = Path(output_path)
    return output_path.with_name(output_path.name + ".partial")


def spark_predictions(
    spark_frame: Any,
    model_uri: str,
    *,
    params: dict[str, Any] | None = None,
    prompt_column: str = "prompt",
    output_column: str = OUTPUT_COLUMN,
    messages_column: str | None = None,
) -> Any:
    """Add `output_column` to a Spark DataFrame: the model's completion of each prompt, or for a chat
    model (`messages_column` set) the assistant's reply to each conversation.

    Args:
        spark_frame: a `pyspark.sql.DataFrame` with a string column `prompt_column`, or an
            array-of-struct (role, content) column `messages_column`.
        model_uri: a logged loraflow model (`models:/NAME@champion`, `runs:/ID/model`, ...).
        params: generation params (max_new_tokens, temperature, top_p, do_sample,
            repetition_penalty, seed), the same for every row.
        prompt_column: the column holding the prompts.
        output_column: the new column's name (a string column).
        messages_column: a chat model's conversations column.

    Returns:
        A new Spark DataFrame (lazy: nothing runs until it is written or collected).
    """
    import mlflow
    from pyspark.sql import SparkSession
    from pyspark.sql.functions import col, lit, struct

    spark = SparkSession.getActiveSession() or spark_frame.sparkSession
    # env_manager="local": the workers use this Python environment (loraflow is installed in it),
    # rather than building a fresh virtualenv per executor from the model's requirements.
    if messages_column is None:
        udf = mlflow.pyfunc.spark_udf(spark, model_uri, result_type="string", env_manager="local", params=params or None)
        # A struct column reaches the model as a DataFrame with a `prompt` column, whatever its name here.
        return spark_frame.withColumn(output_column, udf(struct(col(prompt_column).alias("prompt"))))
    # A chat model answers its reply texts, one per row, with `content_only` (a chat.completion
    # object per row otherwise); the settings travel in each request, as OpenAI's do.
    udf = mlflow.pyfunc.spark_udf(spark, model_uri, result_type="string", env_manager="local",
                                  params={"content_only": True})
    settings = [lit(v).alias(k) for k, v in chat_request(params or {}).items()]
    return spark_frame.withColumn(output_column, udf(struct(col(messages_column).alias("messages"), *settings)))


def chat_request(params: dict[str, Any]) -> dict[str, Any]:
    """batch-predict's generation options as the keys of an OpenAI chat request.

    Raises:
        ConfigError: `repetition_penalty`, which a chat request has no key for.
    """
    if "repetition_penalty" in params:
        raise ConfigError("`repetition_penalty` (--repetition-penalty) does not apply to a chat model: an OpenAI chat "
                          "request has no such key; leave it out")
    request = {ours: params[theirs] for theirs, ours in (("max_new_tokens", "max_tokens"), ("top_p", "top_p"),
                                                          ("seed", "seed")) if theirs in params}
    if params.get("do_sample") is False:
        request["temperature"] = 0.0  # OpenAI's greedy
    elif "temperature" in params or params.get("do_sample"):
        request["temperature"] = float(params.get("temperature", 1.0))
    return request


def predict_table(
    model_uri: str,
    input_path: str | Path,
    output_path: str | Path,
    *,
    params: dict[str, Any] | None = None,
    spark: Any = None,
    prompt_column: str = "prompt",
    messages_column: str | None = None,
    output_column: str = OUTPUT_COLUMN,
    overwrite: bool = False,
    resume: bool = False,
    chunk_rows: int = CHUNK_ROWS,
) -> "pd.DataFrame":
    """Generate a completion for every prompt of a table (or a chat reply for every conversation) and
    write the table with a `text` column.

    Args:
        model_uri: a logged loraflow model URI.
        input_path: a .parquet, .csv or .jsonl/.json file with a `prompt_column` column, or for a chat
            model a `messages_column` column (lists of {"role", "content"}).
        output_path: where to write the input's columns plus `output_column` (.parquet, .csv or .jsonl).
        params: generation params passed to every prediction (see `spark_predictions`).
        spark: a SparkSession to use; True to use the active session or start a local one;
            False for in-process; None (default) for Spark only if a session is already active.
        prompt_column: the column holding the prompts.
        messages_column: the column holding a chat model's conversations; default `messages`
            when the model is a chat model.
        output_column: the column added (it must not be in the input).
        overwrite: replace an existing output file (also the input itself) and discard partial results.
        resume: complete the partial results of an interrupted job (in-process only).
        chunk_rows: rows predicted and kept on disk at a time (in-process).

    Returns:
        The table that was written.

    Raises:
        ConfigError: a bad output path, column name or generation param.
        DataError: an unreadable input, one without the column, without string prompts or with
            conversations that are not lists of messages.
        LoraflowError: a model URI that names nothing, or a chat model given prompts (and the
            reverse), all before the model loads.
        PredictionInterrupted: Ctrl-C or SIGTERM; the finished rows are kept.
    """
    output_path = Path(output_path)
    check_output(output_path, input_path, overwrite=overwrite, resume=resume)
    check_params(params or {})
    frame = data_lib.read_table(input_path, role="input")
    chat = messages_column is not None or (prompt_column not in frame.columns and "messages" in frame.columns)
    column = (messages_column or "messages") if chat else prompt_column
    if chat:
        inputs = read_conversations(frame, input_path, column, output_column)
    else:
        frame = read_prompts(frame, input_path, prompt_column, output_column)
        inputs = frame[prompt_column].tolist()
    check_model_uri(model_uri)
    check_task(model_uri, chat, column)
    session = _spark_session(spark)
    if session is not None and resume:
        raise ConfigError("`resume` applies to in-process prediction only (--no-spark); a Spark job keeps no partial results")
    if session is not None:
        logger.info("predicting %d rows with Spark (%s)", len(frame), session.sparkContext.master)
        result = spark_predictions(session.createDataFrame(frame.assign(**{column: inputs}) if chat else frame),
                                   model_uri, params=params, prompt_column=prompt_column, output_column=output_column,
                                   messages_column=column if chat else None)
        texts = result.select(output_column).toPandas()[output_column].tolist()
    else:
        predict = _chat_predictor(chat_request(params or {})) if chat else _completion_predictor(params)
        texts = _predict_in_chunks(model_uri, inputs, predict, output_path, overwrite=overwrite, resume=resume,
                                   chunk_rows=chunk_rows)
    out = frame.assign(**{output_column: texts})
    with atomic_file(output_path) as tmp:
        _write_table(out, tmp, output_path.suffix.lower())
    shutil.rmtree(partial_dir(output_path), ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------
# Checks that run before the model loads.


def check_output(output_path: Path, input_path: str | Path, *, overwrite: bool = False, resume: bool = False) -> None:
    """Refuse an output that cannot be written or would replace a file without `overwrite`.

    Raises:
        ConfigError: a bad extension, the input itself, an existing file, a folder, a parent that is
            a file, a folder that cannot be written (e.g. under /proc or read-only), or partial
            results of an interrupted job that neither `resume` nor `overwrite` settles.
    """
    name = repr(str(output_path))
    if output_path.suffix.lower() not in OUTPUT_FORMATS:
        raise ConfigError(f"`output` must end in one of {', '.join(OUTPUT_FORMATS)}, got {name}")
    if _same_file(output_path, Path(input_path)) and not overwrite:
        raise ConfigError(f"`output` {name} is the input file; write elsewhere, or pass --overwrite to replace the input")
    if output_path.is_dir():
        raise ConfigError(f"`output` {name} is a folder; name a file in it, e.g. {str(output_path / 'out.parquet')!r}")
    if output_path.exists() and not overwrite:
        raise ConfigError(f"`output` {name} already exists; pass --overwrite to replace it, or choose another path")
    partial = partial_dir(output_path)
    if partial.exists() and not resume and not overwrite:
        raise ConfigError(
            f"`output` {name} has partial results of an interrupted job in {str(partial)!r}; pass --resume to "
            "complete them, or --overwrite to start over"
        )
    if resume and overwrite:
        raise ConfigError("`resume` and `overwrite` contradict each other: --resume keeps partial results, "
                          "--overwrite discards them; pass one")
    _check_writable(output_path.parent, name)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _check_writable(folder: Path, name: str) -> None:
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"`output` {name} cannot be written: {str(existing)!r} is a file, not a folder")
    if existing != folder.absolute():
        try:  # the folders atomic_file would make, made now, so a failure shows before the model loads
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"`output` {name} cannot be written: cannot create {str(folder)!r} "
                              f"({err.strerror or err})") from err
    try:
        handle, probe = tempfile.mkstemp(prefix=".loraflow-probe-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(f"`output` {name} cannot be written: its folder {str(folder)!r} does not accept files "
                          f"({err.strerror or err}); choose a writable folder") from err


def check_params(params: dict[str, Any]) -> None:
    """The ranges the model would refuse after loading, refused before (all problems at once)."""
    problems = []
    tokens = params.get("max_new_tokens")
    if tokens is not None and not 1 <= tokens <= MAX_NEW_TOKENS:
        problems.append(f"`max_new_tokens` must be in 1..{MAX_NEW_TOKENS}, got {tokens}")
    seed = params.get("seed")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        problems.append(f"`seed` must be in 0..{MAX_SEED} (a signed 64-bit integer), got {str(seed)[:40]}")
    if problems:
        raise ConfigError(problems)


def read_prompts(frame: "pd.DataFrame", input_path: str | Path, prompt_column: str,
                 output_column: str) -> "pd.DataFrame":
    """The input table, checked: rows, a column of non-empty string prompts, no `output_column` yet."""
    where = _check_columns(frame, input_path, prompt_column, output_column, "prompt_column")
    if frame[prompt_column].isna().any():
        rows = frame.index[frame[prompt_column].isna()].tolist()[:5]
        raise DataError(f"{where}: column {prompt_column!r} is empty in rows {rows}; fill or drop them")
    not_text = frame.index[frame[prompt_column].map(lambda v: not isinstance(v, str))].tolist()
    if not_text:
        kind = type(frame[prompt_column][not_text[0]]).__name__
        raise DataError(f"{where}: column {prompt_column!r} must hold text prompts, but rows {not_text[:5]} "
                        f"hold {kind} values (e.g. {str(frame[prompt_column][not_text[0]])[:40]!r}); "
                        "convert them to strings or name another column with `prompt_column`")
    return frame.reset_index(drop=True)


def _check_columns(frame: "pd.DataFrame", input_path: str | Path, column: str, output_column: str, option: str) -> str:
    """Refuse a table without rows or without `column`, or that has `output_column` already; its name."""
    if not output_column.strip() or not output_column.isprintable():
        raise ConfigError(f"`output_column` must be a column name (printable, not blank), got {output_column[:300]!r}")
    where = f"input {str(input_path)!r}"
    if len(frame) == 0:
        raise DataError(f"{where}: the table has no rows (columns: {', '.join(map(str, frame.columns))}); "
                        "add at least one row")
    if column not in frame.columns:
        raise DataError(
            f"{where}: no column {column!r} (columns: {', '.join(map(str, frame.columns))}); "
            f"name the column with `{option}`"
        )
    if output_column in frame.columns:
        raise DataError(
            f"{where} already has a column {output_column!r}, which the output would replace; name the new "
            f"column with --output-column NAME (e.g. --output-column {output_column}_new)"
        )
    return where


def read_conversations(frame: "pd.DataFrame", input_path: str | Path, messages_column: str,
                       output_column: str) -> list[list[dict[str, Any]]]:
    """A chat table's conversations, checked (`data.check_conversations`) as plain lists of messages."""
    from loraflow.data.conversations import as_conversation

    where = _check_columns(frame, input_path, messages_column, output_column, "messages_column")
    data_lib.check_conversations(frame[messages_column].tolist(), f"{where} column {messages_column!r}", train_on="all")
    return [as_conversation(v) for v in frame[messages_column]]


# ---------------------------------------------------------------------------------------------
# In-process prediction, kept on disk chunk by chunk.


def _completion_predictor(params: dict[str, Any] | None) -> Callable[[Any, list], list[str]]:
    def predict(model: Any, prompts: list) -> list[str]:
        import pandas as pd

        predictions = model.predict(pd.DataFrame({"prompt": prompts}), params=params or None)
        texts = predictions[OUTPUT_COLUMN] if isinstance(predictions, pd.DataFrame) else predictions
        return [str(t) for t in texts]

    return predict


def _chat_predictor(request: dict[str, Any]) -> Callable[[Any, list], list[str]]:
    """Each conversation as an OpenAI chat request with `request`'s settings; the replies' texts."""
    def predict(model: Any, conversations: list) -> list[str]:
        import pandas as pd

        rows = pd.DataFrame({"messages": conversations, **{k: [v] * len(conversations) for k, v in request.items()}})
        return [str(t) for t in model.predict(rows, params={"content_only": True})]

    return predict


def _predict_in_chunks(model_uri: str, inputs: list, predict: Callable[[Any, list], list[str]], output_path: Path, *,
                       overwrite: bool, resume: bool, chunk_rows: int) -> list[str]:
    import mlflow

    partial = partial_dir(output_path)
    if overwrite and not resume:
        shutil.rmtree(partial, ignore_errors=True)
    done = _read_partial(partial, inputs) if resume else {}
    todo = [i for i in range(len(inputs)) if i not in done]
    logger.info("predicting %d rows in-process (%d already done)", len(todo), len(done))
    if todo:
        with stop_signals(interrupt=True) as caught:
            try:
                model = mlflow.pyfunc.load_model(model_uri)
                for start in range(0, len(todo), chunk_rows):
                    rows = todo[start:start + chunk_rows]
                    texts = predict(model, [inputs[i] for i in rows])
                    _keep_chunk(partial, rows, [inputs[i] for i in rows], texts)
                    done.update(zip(rows, texts))
            except KeyboardInterrupt:
                raise PredictionInterrupted(caught["signal"] or "SIGINT", partial, len(done), len(inputs)) from None
    return [done[i] for i in range(len(inputs))]


def _keep_chunk(partial: Path, rows: list[int], prompts: list, texts: list[str]) -> None:
    partial.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps({"row": r, "prompt": p, "text": t}, ensure_ascii=False) for r, p, t in zip(rows, prompts, texts))
    with atomic_file(partial / f"rows-{rows[0]:09d}-{rows[-1]:09d}.jsonl") as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _read_partial(partial: Path, prompts: list) -> dict[int, str]:
    """The finished rows kept in `partial` ({row: text}); none if there is no such folder."""
    done: dict[int, str] = {}
    if not partial.is_dir():
        logger.warning("--resume: no partial results at %s; predicting every row", partial)
        return done
    for chunk in sorted(partial.glob("rows-*.jsonl")):
        for line in chunk.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            row = record["row"]
            if row >= len(prompts) or prompts[row] != record["prompt"]:
                raise DataError(
                    f"the partial results in {str(partial)!r} were made from another input (row {row} differs); "
                    "pass --overwrite to start over"
                )
            done[row] = record["text"]
    return done


def _spark_session(spark: Any):
    """The SparkSession `predict_table` should use, or None for in-process."""
    if spark is False:
        return None
    if spark is not None and spark is not True:
        return spark  # a session the caller passed in
    try:
        from pyspark.sql import SparkSession
    except ImportError as err:
        if spark is None:
            return None
        raise ConfigError("`spark` was requested but pyspark is not installed; pip install pyspark") from err
    active = SparkSession.getActiveSession()
    if active is not None or spark is None:
        return active
    # --spark without a cluster: a local session on every core of this machine.
    import sys

    builder = SparkSession.builder.master("local[*]").appName("loraflow-batch-predict")
    # Python workers must run this interpreter (with loraflow installed), not whatever `python3` is on PATH.
    return builder.config("spark.pyspark.python", os.environ.get("PYSPARK_PYTHON", sys.executable)).getOrCreate()


def _write_table(frame: "pd.DataFrame", path: Path, suffix: str) -> None:
    if suffix == ".parquet":
        frame.to_parquet(path, index=False)
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
