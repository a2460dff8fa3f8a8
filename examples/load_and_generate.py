"""Load a logged loraflow model two ways and generate with it.

    python examples/load_and_generate.py [MODEL_URI]

MODEL_URI defaults to the newest loraflow model logged by a finished run in the tracking store
(MLFLOW_TRACKING_URI). Runs without a model (`mlflow run -e promote` makes one) are skipped.
"""

from __future__ import annotations

import sys

import mlflow

import loraflow.flavor

# Both are held out on the defaults (the seeded eval split): fine-tuning never showed them, the
# built-in model learned the facts in pre-training and the answer format in fine-tuning.
PROMPTS = ["Question: What does a cow say?\nAnswer:", "Question: What is the capital of Portugal?\nAnswer:"]


def newest_model_uri(scan: int = 50) -> str:
    """The newest model with the loraflow flavor whose run FINISHED (MLflow 3's logged-model records)."""
    from mlflow import MlflowClient
    from mlflow.models import Model

    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    models = mlflow.search_logged_models(
        experiment_ids=experiments, max_results=scan,
        order_by=[{"field_name": "creation_timestamp", "ascending": False}], output_format="list",
    ) if experiments else []
    for logged in models:
        if "READY" not in str(logged.status) or not logged.source_run_id:
            continue
        if client.get_run(logged.source_run_id).info.status != "FINISHED":
            continue
        try:
            if loraflow.flavor.FLAVOR_NAME in Model.load(logged.model_uri).flavors:
                return logged.model_uri
        except Exception:  # its MLmodel cannot be read: not a model to pick
            continue
    raise SystemExit("no finished run has logged a loraflow model in this tracking store "
                     f"({mlflow.get_tracking_uri()}): run `mlflow run . -P r=16 --env-manager local` first, "
                     "or pass a MODEL_URI")


def main() -> None:
    uri = sys.argv[1] if len(sys.argv) > 1 else newest_model_uri()
    print(f"model: {uri}")

    # 1. Inference through pyfunc, as `mlflow models serve` does.
    pyfunc_model = mlflow.pyfunc.load_model(uri)
    answers = pyfunc_model.predict(PROMPTS, params={"max_new_tokens": 24})
    for prompt, text in zip(PROMPTS, answers["text"]):
        print(f"{prompt!r} -> {text!r}")

    # 2. Natively, as a trainable PeftModel for further training.
    model, tokenizer = loraflow.flavor.load_model(uri, is_trainable=True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"native: {type(model).__name__} with {trainable:,} trainable parameters")


if __name__ == "__main__":
    main()
