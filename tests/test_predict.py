"""Batch inference on Spark: a registered loraflow model as a Spark UDF equals pyfunc predict.

One local[2] SparkSession and one tiny registered model serve the whole module (Spark starts in
seconds, but a Python worker loads the model once per UDF).
"""

from __future__ import annotations

import os
import sys

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from model_helpers import CHATS, save_chat_model

from loraflow.cli import main
from loraflow.config import parse_settings
from loraflow.train import run_training
from helpers import fresh_store

pytestmark = pytest.mark.slow

NAME = "spark-lora"
URI = f"models:/{NAME}@champion"
PROMPTS = [
    "Question: What does a cow say?\nAnswer:",
    "Question: What colour is the sky?\nAnswer:",
    "Question: How many legs does a spider have?\nAnswer:",
]
PARAMS = {"max_new_tokens": 8}


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """A model trained for 2 steps, registered as NAME with the alias `champion`, in a sqlite store."""
    tmp = tmp_path_factory.mktemp("spark-store")
    uri = fresh_store(tmp / 'mlflow.db')
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    os.environ.update(MLFLOW_TRACKING_URI=uri, MLFLOW_REGISTRY_URI=uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        lora, settings = parse_settings({"max_steps": "2", "eval_steps": "2", "r": "4", "registered_model_name": NAME,
                                         "output_dir": str(tmp / "outputs")})
        result = run_training(lora, settings)
        assert result.ok and result.registered_version
        MlflowClient().set_registered_model_alias(NAME, "champion", result.registered_version)
        yield URI
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def spark():
    from pyspark.sql import SparkSession

    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # workers need this venv (pandas, loraflow)
    session = (
        SparkSession.builder.master("local[2]")
        .appName("loraflow-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .getOrCreate()
    )
    yield session
    session.stop()


def pyfunc_texts(uri: str, prompts: list[str], params: dict) -> list[str]:
    return mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"prompt": prompts}), params=params)["text"].tolist()


def test_spark_udf_equals_pyfunc_predict_with_params_passed_through(champion, spark):
    frame = spark.createDataFrame(pd.DataFrame({"prompt": PROMPTS}))
    texts = {}
    for max_new_tokens in (8, 2):
        params = {"max_new_tokens": max_new_tokens}
        udf = mlflow.pyfunc.spark_udf(spark, champion, result_type="string", env_manager="local", params=params)
        rows = frame.withColumn("text", udf("prompt")).toPandas()
        assert rows["prompt"].tolist() == PROMPTS
        texts[max_new_tokens] = rows["text"].tolist()
        assert texts[max_new_tokens] == pyfunc_texts(champion, PROMPTS, params)
    assert texts[2] != texts[8]  # the param reached the model


def test_batch_predict_command_gives_the_same_table_with_and_without_spark(champion, spark, tmp_path):
    source = tmp_path / "prompts.parquet"
    pd.DataFrame({"id": [1, 2, 3], "prompt": PROMPTS}).to_parquet(source)
    tables = {}
    for flag in ("--spark", "--no-spark"):
        out = tmp_path / f"out{flag}.parquet"
        result = CliRunner().invoke(main, ["batch-predict", "--model-uri", champion, "--input", str(source),
                                           "--output", str(out), flag, "--max-new-tokens", "8"])
        assert result.exit_code == 0, result.output + repr(result.exception)
        tables[flag] = pd.read_parquet(out)
    assert tables["--spark"].equals(tables["--no-spark"])
    assert tables["--spark"].columns.tolist() == ["id", "prompt", "text"]
    assert tables["--spark"]["text"].tolist() == pyfunc_texts(champion, PROMPTS, PARAMS)


def test_batch_predict_names_a_missing_prompt_column_before_loading_anything(tmp_path):
    source = tmp_path / "prompts.csv"
    source.write_text("question\nWhat does a cow say?\n")
    result = CliRunner().invoke(main, ["batch-predict", "--model-uri", "models:/does-not-exist@champion",
                                       "--input", str(source), "--output", str(tmp_path / "out.jsonl")])
    assert result.exit_code == 2
    assert "no column 'prompt'" in result.output and "question" in result.output


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tiny_path, tiny_tokenizer) -> str:
    return save_chat_model(tmp_path_factory.mktemp("spark-chat") / "model", tiny_path, tiny_tokenizer)


def test_a_chat_model_answers_a_spark_messages_column_with_its_replies(chat_model, spark):
    from loraflow.predict import spark_predictions

    frame = spark.createDataFrame([(i, chat) for i, chat in enumerate(CHATS)],
                                  "id long, messages array<struct<role: string, content: string>>").repartition(2)
    rows = spark_predictions(frame, chat_model, params={"max_new_tokens": 4}, messages_column="messages",
                             output_column="reply").orderBy("id").toPandas()
    model = mlflow.pyfunc.load_model(chat_model)
    expected = [model.predict({"messages": chat, "max_tokens": 4})["choices"][0]["message"]["content"] for chat in CHATS]
    assert rows["reply"].tolist() == expected  # one string per row, also from a one-row partition
    # The UDF itself, with `content_only`, over a struct (a bare column would be spread over MLflow's
    # chat schema, its optional integer columns filled with NaN, which its enforcement refuses)
    from pyspark.sql.functions import struct

    udf = mlflow.pyfunc.spark_udf(spark, chat_model, result_type="string", env_manager="local",
                                  params={"content_only": True})
    direct = frame.withColumn("reply", udf(struct("messages"))).orderBy("id").toPandas()
    assert direct["reply"].tolist() == [model.predict({"messages": c})["choices"][0]["message"]["content"] for c in CHATS]
