"""Load a logged loraflow model two ways and generate with it.

    python examples/load_and_generate.py [MODEL_URI]

MODEL_URI defaults to the model of the newest run in the tracking store (MLFLOW_TRACKING_URI).
"""

from __future__ import annotations

import sys

import mlflow

import loraflow.flavor

# Both are held out on the defaults (the seeded eval split): fine-tuning never showed them, the
# built-in model learned the facts in pre-training and the answer format in fine-tuning.
PROMPTS = ["Question: What does a cow say?\nAnswer:", "Question: What is the capital of Portugal?\nAnswer:"]


def newest_model_uri() -> str:
    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string="attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if runs.empty:
        raise SystemExit("no finished run found: run `mlflow run . -P r=16 --env-manager local` first")
    return f"runs:/{runs['run_id'][0]}/model"


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
