"""Evaluate a logged loraflow model with `mlflow.genai.evaluate`: the pyfunc model as `predict_fn`,
and exact match (loraflow's definition) as a `@scorer`. Runs offline.

    python examples/genai_evaluate.py [MODEL_URI] [--rows N]

MODEL_URI defaults to the newest logged loraflow model in the tracking store. The data is the
held-out eval split of the bundled sample (the questions that training's split never shows).
"""

from __future__ import annotations

import argparse

import mlflow
from mlflow.genai.scorers import scorer

from loraflow import data, metrics
from loraflow.config import DataSettings, OptimSettings


@scorer
def exact_match(outputs: str, expectations: dict) -> bool:
    """Normalised exact match: lowercase, whitespace collapsed, punctuation stripped at both ends."""
    return metrics.exact_match(outputs, expectations["expected_response"]) == 1.0


def newest_model_uri() -> str:
    """The newest logged model that has the loraflow flavor."""
    from mlflow.models import Model

    newest = mlflow.search_logged_models(order_by=[{"field_name": "creation_time", "ascending": False}],
                                         output_format="list")
    for logged in newest:
        try:
            if "loraflow" in Model.load(logged.model_uri).flavors:
                return logged.model_uri
        except Exception:  # a model whose artifacts are gone: look further
            continue
    raise SystemExit("no loraflow model found: run `mlflow run . -P r=16 --env-manager local` first")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_uri", nargs="?")
    parser.add_argument("--rows", type=int, default=16, help="held-out questions to evaluate")
    args = parser.parse_args()
    uri = args.model_uri or newest_model_uri()
    model = mlflow.pyfunc.load_model(uri)

    def predict_fn(question: str) -> str:
        return model.predict([question], params={"max_new_tokens": 24})["text"][0]

    held_out = data.load_training_data(DataSettings(), OptimSettings().seed).eval.frame.head(args.rows)
    rows = [{"inputs": {"question": q}, "expectations": {"expected_response": a}}
            for q, a in zip(held_out["prompt"], held_out["completion"])]
    result = mlflow.genai.evaluate(data=rows, predict_fn=predict_fn, scorers=[exact_match])
    print(f"model: {uri}")
    print(f"exact_match/mean: {result.metrics['exact_match/mean']:.3f} over {len(rows)} held-out questions")


if __name__ == "__main__":
    main()
