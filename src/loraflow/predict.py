"""Batch inference with a logged loraflow model: a table of prompts in, the same table plus `text` out.

Two engines run the same pyfunc model, so their outputs are equal:

- in-process: `mlflow.pyfunc.load_model(uri).predict(frame, params)`;
- Spark: `mlflow.pyfunc.spark_udf(spark, uri, result_type="string")`, which loads the model once
  per Python worker and predicts each partition's prompts there.

`predict_table` reads and writes files (the `loraflow batch-predict` command). For tables too big
for one machine's memory, `spark_predictions` adds the column to a Spark DataFrame you read and
write with Spark yourself.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow import data as data_lib
from loraflow.errors import ConfigError, DataError

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

OUTPUT_COLUMN = "text"
OUTPUT_FORMATS = (".parquet", ".csv", ".jsonl")


def spark_predictions(
    spark_frame: Any,
    model_uri: str,
    *,
    params: dict[str, Any] | None = None,
    prompt_column: str = "prompt",
    output_column: str = OUTPUT_COLUMN,
) -> Any:
    """Add `output_column` to a Spark DataFrame: the model's completion of each prompt.

    Args:
        spark_frame: a `pyspark.sql.DataFrame` with a string column `prompt_column`.
        model_uri: a logged loraflow model (`models:/NAME@champion`, `runs:/ID/model`, ...).
        params: generation params (max_new_tokens, temperature, top_p, do_sample,
            repetition_penalty, seed), the same for every row.
        prompt_column: the column holding the prompts.
        output_column: the new column's name.

    Returns:
        A new Spark DataFrame (lazy: nothing runs until it is written or collected).
    """
    import mlflow
    from pyspark.sql import SparkSession
    from pyspark.sql.functions import col, struct

    spark = SparkSession.getActiveSession() or spark_frame.sparkSession
    # env_manager="local": the workers use this Python environment (loraflow is installed in it),
    # rather than building a fresh virtualenv per executor from the model's requirements.
    udf = mlflow.pyfunc.spark_udf(spark, model_uri, result_type="string", env_manager="local", params=params or None)
    # A struct column reaches the model as a DataFrame with a `prompt` column, whatever its name here.
    return spark_frame.withColumn(output_column, udf(struct(col(prompt_column).alias("prompt"))))


def predict_table(
    model_uri: str,
    input_path: str | Path,
    output_path: str | Path,
    *,
    params: dict[str, Any] | None = None,
    spark: Any = None,
    prompt_column: str = "prompt",
) -> "pd.DataFrame":
    """Generate a completion for every prompt of a table and write the table with a `text` column.

    Args:
        model_uri: a logged loraflow model URI.
        input_path: a .parquet, .csv or .jsonl/.json file with a `prompt_column` column.
        output_path: where to write the input's columns plus `text` (.parquet, .csv or .jsonl).
        params: generation params passed to every prediction (see `spark_predictions`).
        spark: a SparkSession to use; True to use the active session or start a local one;
            False for in-process; None (default) for Spark only if a session is already active.
        prompt_column: the column holding the prompts.

    Returns:
        The table that was written.

    Raises:
        ConfigError: an unsupported output extension.
        DataError: an unreadable input, or one without `prompt_column` (before the model loads).
    """
    output_path = Path(output_path)
    if output_path.suffix.lower() not in OUTPUT_FORMATS:
        raise ConfigError(
            f"`output` must end in one of {', '.join(OUTPUT_FORMATS)}, got {str(output_path)!r}"
        )
    frame = data_lib.read_table(input_path, role="input")
    if prompt_column not in frame.columns:
        raise DataError(
            f"input {str(input_path)!r}: no column {prompt_column!r} (columns: {', '.join(map(str, frame.columns))}); "
            "name the prompt column with `prompt_column`"
        )
    if frame[prompt_column].isna().any():
        rows = frame.index[frame[prompt_column].isna()].tolist()[:5]
        raise DataError(f"input {str(input_path)!r}: column {prompt_column!r} is empty in rows {rows}; fill or drop them")
    frame = frame.reset_index(drop=True)
    session = _spark_session(spark)
    if session is not None:
        logger.info("predicting %d prompts with Spark (%s)", len(frame), session.sparkContext.master)
        result = spark_predictions(session.createDataFrame(frame), model_uri, params=params, prompt_column=prompt_column)
        out = frame.assign(**{OUTPUT_COLUMN: result.select(OUTPUT_COLUMN).toPandas()[OUTPUT_COLUMN].tolist()})
    else:
        logger.info("predicting %d prompts in-process", len(frame))
        out = frame.assign(**{OUTPUT_COLUMN: predict_in_process(model_uri, frame[prompt_column].tolist(), params)})
    _write_table(out, output_path)
    return out


def predict_in_process(model_uri: str, prompts: list[str], params: dict[str, Any] | None = None) -> list[str]:
    """The model's completions of `prompts`, through `mlflow.pyfunc` in this process."""
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model(model_uri)
    predictions = model.predict(pd.DataFrame({"prompt": prompts}), params=params or None)
    texts = predictions[OUTPUT_COLUMN] if isinstance(predictions, pd.DataFrame) else predictions
    return [str(t) for t in texts]


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


def _write_table(frame: "pd.DataFrame", path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        frame.to_parquet(path, index=False)
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
