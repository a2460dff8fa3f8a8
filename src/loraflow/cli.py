"""The `loraflow` command line: a thin layer that parses options and calls the library.

Options are generated from the settings dataclasses, so `--help` and the library's field docs
never disagree. Every option is read as a string and validated by `loraflow.config`, so all bad
values are reported together (exit code 2), never as a traceback.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import click

from loraflow import config
from loraflow.errors import LoraflowError
from loraflow.settings_file import load_yaml
from loraflow.export import DTYPES as EXPORT_DTYPES
from loraflow.export import FORMATS as EXPORT_FORMATS
from loraflow.flavor.layout import MAX_SEED, short
from loraflow.signals import exit_code
from loraflow.sweep.command import make_command as make_sweep_command


def option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _metavar(cls: type, field: str) -> str:
    hint = str(config.field_type(cls, field))
    for word, metavar in (("bool", "BOOL"), ("int", "INTEGER"), ("float", "FLOAT"), ("tuple", "LIST")):
        if word in hint:
            return metavar
    return "TEXT"


def _default_text(cls: type, field: str) -> str:
    value = config.field_default(cls, field)
    if value is None or value == ():
        return ""
    return ",".join(value) if isinstance(value, tuple) else str(value)


def settings_options(*classes: type, exclude: tuple[str, ...] = ()) -> Callable:
    """Decorator adding one `--option` per settings field, with the field's help text."""

    def decorate(command: Callable) -> Callable:
        for cls in reversed(classes):
            for field, text in reversed(list(config.field_help(cls).items())):
                if field in exclude:
                    continue
                default = _default_text(cls, field)
                command = click.option(
                    option_name(field),
                    field,
                    default=None,
                    metavar=_metavar(cls, field),
                    help=text + (f"  [default: {default}]" if default else ""),
                )(command)
        return command

    return decorate


config_file_option = click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="YAML file of settings (same names as the options, with underscores); options override it.",
)


def collect_settings(config_file: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """Merge a YAML file and the options that were actually given (options win)."""
    raw = load_yaml(config_file) if config_file else {}
    raw.update({k: v for k, v in options.items() if v is not None})
    return raw


def _with_option_names(message: str) -> str:
    known = set(config.field_names(config.LoraSettings) + config.field_names(config.TrainSettings))

    def name_option(match: re.Match) -> str:
        field = match.group(1)
        return f"`{field}` ({option_name(field)})" if field in known else match.group(0)

    return re.sub(r"`(\w+)`", name_option, message)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn loraflow's input errors into a click usage error: exit code 2 and no traceback."""
    try:
        yield
    except LoraflowError as err:
        raise click.UsageError(_with_option_names(str(err))) from err


BUG_REPORT = "please report it, with the traceback below and the command you ran, in loraflow's issue tracker"
USER_MLFLOW_ERRORS = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


class UserMlflowError(click.ClickException):
    """An MLflow error caused by the user's input (an unknown model URI, a bad model): exit code 2."""

    exit_code = 2


class LoraflowGroup(click.Group):
    """The entry point: every command's errors end here, so each has one documented exit code.

    A user's mistake is a one-line message (click's own, a `LoraflowError`, or an MLflow error with a
    user's error code); Ctrl-C exits 130; anything else is a bug in loraflow: its traceback is printed
    after one line saying so, and the exit code is 1.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("loraflow: interrupted (SIGINT)", err=True)
            raise SystemExit(exit_code("SIGINT")) from None
        except LoraflowError as err:
            from loraflow.registry import RegistryError

            if isinstance(err, RegistryError):
                raise click.ClickException(str(err)) from err
            raise click.UsageError(_with_option_names(str(err))) from err
        except Exception as err:
            _mlflow_error(err)  # imported only here: `--help` must not pay for importing mlflow
            _report_bug()


def _mlflow_error(err: Exception) -> None:
    """Raise the click error for an MLflow error that is not a bug: a lost connection (exit 1) or
    the user's input (exit 2); return for anything else."""
    from mlflow.exceptions import MlflowException

    from loraflow.tracking import is_connection_failure

    if not isinstance(err, MlflowException):
        return
    if is_connection_failure(err):  # the server went away mid-command: a tracking error, exit 1
        raise click.ClickException(f"MLflow cannot be reached: {short(err.message, quote=False)}") from err
    if err.error_code in USER_MLFLOW_ERRORS:  # some quote whole files: the message is cut
        raise UserMlflowError(short(err.message, quote=False)) from err


def _report_bug() -> None:
    import traceback

    click.echo(f"loraflow: this is a bug in loraflow, not a mistake in your input; {BUG_REPORT}.", err=True)
    click.echo(traceback.format_exc().rstrip(), err=True)
    raise SystemExit(1)


@click.group(cls=LoraflowGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="loraflow")
def main() -> None:
    """Fine-tune causal language models with LoRA, tracked and packaged with MLflow."""
    from loraflow.report import configure_logging

    configure_logging()


@main.command()
@config_file_option
@settings_options(config.LoraSettings, config.TrainSettings)
def validate(config_file: str | None, **options: Any) -> None:
    """Check settings against the base model's architecture, without loading its weights.

    Prints the resolved settings and the parameter report of the LoRA-wrapped model skeleton.
    """
    from loraflow.base_models import load_skeleton
    from loraflow.lora import apply_lora, format_report, parameter_report, validate_settings

    with user_errors():
        lora, train = validate_settings(collect_settings(config_file, options))
    click.echo("LoRA settings:")
    for key, value in config.to_dict(lora).items():
        click.echo(f"  {key:<24}{value}")
    base = train.model
    click.echo(f"Base model: {base.base_model}")
    skeleton = load_skeleton(base.base_model, revision=base.revision, trust_remote_code=base.trust_remote_code)
    report = parameter_report(apply_lora(skeleton, lora))
    click.echo("Parameter report:")
    click.echo(format_report(report))


@main.command()
@config_file_option
@settings_options(config.LoraSettings, config.TrainSettings)
@click.option(
    "--resume-from",
    default=None,
    help="Continue an interrupted run from a checkpoint folder or a run id (its settings apply; options override).",
)
def train(config_file: str | None, resume_from: str | None, **options: Any) -> None:
    """Fine-tune the base model with LoRA, evaluate it, and log everything to MLflow."""
    from loraflow import checkpoint
    from loraflow.lora import validate_settings
    from loraflow.tracking import retry_briefly
    from loraflow.train import TrainingInterrupted, run_training

    retry_briefly()
    with user_errors():
        raw = collect_settings(config_file, options)
        given, resume = set(raw), None
        if resume_from:
            output_dir = raw.get("output_dir") or config.TrackingSettings().output_dir
            resume = checkpoint.resolve_checkpoint(resume_from, output_dir)
            raw = {**checkpoint.read_state(resume).settings, **raw}
        lora, settings = validate_settings(raw)
        try:
            result = run_training(lora, settings, explicit=given, resume=resume)
        except TrainingInterrupted as stop:
            click.echo(f"loraflow: {stop}", err=True)
            raise SystemExit(exit_code(stop.signal_name)) from None
    if not result.ok:
        raise SystemExit(1)


@main.command("batch-predict")
@click.option("--model-uri", required=True, help="A logged loraflow model: models:/NAME@champion, runs:/RUN_ID/model, ...")
@click.option("--input", "input_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Prompts: a .parquet, .csv or .jsonl file with a prompt column (a messages column for a chat model).")
@click.option("--output", "output_path", required=True, type=click.Path(dir_okay=False),
              help="Where to write the input's columns plus `text`: .parquet, .csv or .jsonl (never replaced "
                   "without --overwrite).")
@click.option("--prompt-column", default="prompt", show_default=True, help="The column holding the prompts.")
@click.option("--messages-column", default=None,
              help="For a chat model: the column holding the conversations (lists of {role, content}). "
                   "[default: messages, when there is no prompt column]")
@click.option("--output-column", default="text", show_default=True,
              help="The column added for the completions, or a chat model's replies (must not be in the input).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file (even the input) and discard partial results.")
@click.option("--resume", is_flag=True,
              help="Complete an interrupted job: keep the rows in <output>.partial/ and predict the rest.")
@click.option("--spark/--no-spark", default=None,
              help="Predict with the model as a Spark UDF (the active Spark session, else local[*]) or in this "
                   "process. Default: Spark only when a Spark session is already active.")
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=None, help="Tokens to generate per prompt.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=None, help="Sampling temperature.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None, help="Nucleus sampling mass.")
@click.option("--do-sample/--greedy", default=None, help="Sample, or decode greedily.")
@click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Penalty for repeated tokens (1: none).")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=None, help="Seed for sampling (0 .. 2^63-1).")
@click.option("--chunk-rows", type=click.IntRange(1, 100_000), default=64, hidden=True,
              help="Rows predicted, then kept on disk, at a time.")
def batch_predict(model_uri: str, input_path: str, output_path: str, prompt_column: str, messages_column: str | None,
                  output_column: str, overwrite: bool, resume: bool, spark: bool | None, chunk_rows: int,
                  **generation: Any) -> None:
    """Complete every prompt of a table with a logged model (or, for a chat model, answer every
    conversation) and write the table with a `text` column.

    Exit codes: 0 written, 1 tracking error, 2 bad option, input or model URI (before the model
    loads), 130/143 interrupted (finished rows kept; rerun with --resume).
    """
    from loraflow.predict import PredictionInterrupted, predict_table
    from loraflow.tracking import retry_briefly

    retry_briefly()
    params = {k: v for k, v in generation.items() if v is not None}
    with user_errors():
        try:
            table = predict_table(model_uri, input_path, output_path, params=params, spark=spark,
                                  prompt_column=prompt_column, messages_column=messages_column,
                                  output_column=output_column, overwrite=overwrite,
                                  resume=resume, chunk_rows=chunk_rows)
        except PredictionInterrupted as stop:
            click.echo(f"loraflow: {stop}", err=True)
            raise SystemExit(exit_code(stop.signal_name)) from None
    click.echo(f"loraflow: wrote {len(table)} predictions to {output_path}")


@main.command()
@click.argument("local_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--run-id", default=None, help="The training run the model came from (recorded in the new upload run). "
              "Default: the run in a model-<run_id> folder name.")
@click.option("--registered-model-name", default=None, help="Also register it as a new version of this model.")
def upload(local_dir: str, run_id: str | None, registered_model_name: str | None) -> None:
    """Log a model that training saved locally (the tracking server was down) to MLflow.

    It goes into a new run tagged with the training run's id and status (that run is never changed);
    the folder's adapter digest and base fingerprint are checked first.
    """
    from loraflow.tracking import retry_briefly
    from loraflow.upload import upload_model

    retry_briefly()
    with user_errors():
        uri = upload_model(local_dir, run_id=run_id, registered_model_name=registered_model_name)
    click.echo(f"loraflow: logged {local_dir} as {uri}")


@main.command()
@click.argument("model_uri")
@click.option("--data", "data_path", required=True,
              help="A .jsonl/.csv/.parquet file with prompt + completion or messages columns, or builtin:qa / builtin:chat.")
@click.option("--prompt-column", default=None, help="The prompt column.  [default: prompt]")
@click.option("--completion-column", default=None, help="The expected-answer column.  [default: completion]")
@click.option("--messages-column", default=None, help="The conversations column (the last assistant reply is expected).")
@click.option("--samples", type=click.IntRange(min=1), default=None, help="Score a seeded subset of this many rows.  [default: all]")
@click.option("--seed", type=int, default=42, show_default=True, help="Seed of the subset.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
              help="Most tokens per answer.  [default: the longest expected answer + 8]")
@click.option("--log-to", default=None, metavar="RUN_ID|new",
              help="Log the metrics and the samples table to this run (its status is kept), or to a new run.")
def evaluate(model_uri: str, data_path: str, samples: int | None, seed: int, max_new_tokens: int | None,
             log_to: str | None, **columns: Any) -> None:
    """Score a logged model on a data file: normalised exact match and token F1 of greedy answers.

    The same metrics a training run logs at every evaluation (`eval_exact_match`, `eval_token_f1`).
    """
    from loraflow.evaluation import evaluate_model

    with user_errors():
        data = config.parse_settings({k: v for k, v in columns.items() if v is not None})[1].data
        result = evaluate_model(model_uri, data_path, settings=data, samples=samples, seed=seed,
                                max_new_tokens=max_new_tokens, log_to=log_to)
    for key, value in result.metrics.items():
        click.echo(f"{key:<20}{value:.4f}")
    click.echo(f"samples             {len(result.rows)}")
    if result.run_id:
        click.echo(f"logged to run       {result.run_id}")


# ---------------------------------------------------------------------------------------------
# Model registry: promote and roll back (loraflow.registry). Exit codes: 0 decided (promoted or
# not), 1 registry error (unreachable, unknown model or version, not a loraflow model, metric
# missing, unfinished run, nothing to roll back), 2 bad option, 3 rejected under --require-promotion.


class _VersionType(click.ParamType):
    """A model version number; an empty string (MLproject's "unset") means the newest version."""

    name = "VERSION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str | None:
        from loraflow.promotion import version_problem

        if value is None or str(value).strip() == "":
            return None
        if version_problem(str(value)):
            self.fail(f"{value!r} is not a version number: give a positive integer (e.g. 3), or leave it empty "
                      "for the newest version", param, ctx)
        return str(int(str(value).strip()))


def _check_alias(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from loraflow.promotion import alias_problem

    if problem := alias_problem(value):
        raise click.BadParameter(problem.replace("`alias` ", ""), ctx, param)
    return value


def _check_metric(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not value.strip():
        raise click.BadParameter("must name a metric of the training runs, e.g. eval_loss", ctx, param)
    return value.strip()


def _check_model_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not value.strip():
        raise click.BadParameter("must name a registered model (train with --registered-model-name NAME), got ''",
                                 ctx, param)
    return value


model_name_option = click.option("--model-name", required=True, callback=_check_model_name,
                                 help="The registered model (train with --registered-model-name).")
alias_option = click.option("--alias", default="champion", show_default=True, callback=_check_alias,
                            help="The alias served to users; the replaced version moves to `previous` "
                                 "(`<alias>-previous` for other aliases).")


@contextlib.contextmanager
def registry_errors() -> Iterator[None]:
    """A registry that cannot serve the request is an error (exit code 1), not a usage error."""
    from loraflow.registry import RegistryError
    from loraflow.tracking import retry_briefly

    retry_briefly()
    try:
        yield
    except RegistryError as err:
        raise click.ClickException(str(err)) from err


@main.command()
@model_name_option
@click.option("--version", type=_VersionType(), default=None, help="The candidate version.  [default: the newest]")
@click.option("--metric", default="eval_loss", show_default=True, callback=_check_metric,
              help="Metric compared, read from each version's source run.")
@click.option("--mode", type=click.Choice(["min", "max"]), default="min", show_default=True,
              help="min: lower is better (a loss); max: higher is better.")
@click.option("--min-delta", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="The smallest improvement over the champion that counts.")
@alias_option
@click.option("--require-promotion", is_flag=True,
              help="Exit with code 3 when the candidate is rejected (for CI pipelines).")
@click.option("--force", is_flag=True,
              help="Promote even though the current champion's metric cannot be read (its run lacks it); the "
                   "candidate still needs the metric, a finished run and the health check.")
def promote(model_name: str, version: str | None, metric: str, mode: str, min_delta: float, alias: str,
            require_promotion: bool, force: bool) -> None:
    """Give the alias to a version if it is healthy and beats the current champion on the metric.

    The candidate must load through pyfunc and answer its logged input example with non-empty
    text, and its source run must have FINISHED. Prints the decision in one line; exits 0 whether
    or not the candidate was promoted (see --require-promotion).
    """
    from loraflow.registry import promote_if_better

    with user_errors(), registry_errors():
        decision = promote_if_better(model_name, version=version, metric=metric, mode=mode, min_delta=min_delta,
                                     alias=alias, **({"force": True} if force else {}))
    click.echo(decision.summary())
    if require_promotion and not decision.promoted and not decision.already_champion:
        raise SystemExit(3)


@main.command()
@model_name_option
@alias_option
def rollback(model_name: str, alias: str) -> None:
    """Undo the last promotion: the `previous` version takes the alias back (and they swap)."""
    from loraflow.registry import rollback as rollback_alias

    with user_errors(), registry_errors():
        result = rollback_alias(model_name, alias=alias)
    click.echo(result.summary())


# ---------------------------------------------------------------------------------------------
# Export (loraflow.export): a merged HF folder, a peft adapter folder, or MLflow's transformers flavor.


def _unset_if_empty(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """MLproject passes "" for an unset value."""
    return value if value else None


@main.command("export")
@click.argument("model_uri", required=False)
@click.option("--model-uri", "model_uri_option", default=None, callback=_unset_if_empty,
              help="The model, as an option instead of the MODEL_URI argument (as MLproject passes it).")
@click.option("--format", "export_format", required=True, type=click.Choice(EXPORT_FORMATS),
              help="merged: a plain Hugging Face folder (adapter merged in); adapter: a peft folder (vLLM "
                   "--lora-modules); transformers: log it with MLflow's transformers flavor.")
@click.option("--output", default=None, callback=_unset_if_empty,
              help="The folder to write (merged, adapter). Written beside it first, then renamed into place.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(list(EXPORT_DTYPES)),
              help="Weights dtype of a merged export; auto: the base model's recorded dtype.")
@click.option("--overwrite", type=click.BOOL, default=False, is_flag=False, flag_value=True,
              help="Replace a non-empty --output folder (once the new export is complete). A flag, or "
                   "--overwrite true/false.")
@click.option("--force", type=click.BOOL, default=False, is_flag=False, flag_value=True,
              help="Merge a model trained on a quantized base (QLoRA) onto that base dequantized, in 16-bit: "
                   "lossy, so refused without it. A flag, or --force true/false.")
@click.option("--registered-model-name", default=None, callback=_unset_if_empty,
              help="--format transformers: also register the logged model under this name.")
def export(model_uri: str | None, model_uri_option: str | None, export_format: str, output: str | None, dtype: str,
           overwrite: bool, force: bool, registered_model_name: str | None) -> None:
    """Export the loraflow model MODEL_URI (models:/NAME@champion, runs:/..., a folder) for serving elsewhere.

    Writes a merged Hugging Face folder, a plain peft adapter folder (vLLM --lora-modules), or logs
    the merged model with MLflow's transformers flavor, and records the source in loraflow_export.json.
    """
    from loraflow.export import export_model

    if bool(model_uri) == bool(model_uri_option):
        raise click.UsageError("give the model once: as the MODEL_URI argument or as --model-uri "
                               "(e.g. loraflow export models:/NAME@champion --format merged --output DIR)")
    model_uri = model_uri or model_uri_option
    with user_errors():
        result = export_model(model_uri, export_format, output, dtype=dtype, overwrite=overwrite, force=force,
                              registered_model_name=registered_model_name)
    click.echo(f"loraflow: exported {model_uri} as {export_format} to {result.output}")
    if result.run_id:
        click.echo(f"loraflow: run {result.run_id}" + (
            f", registered {registered_model_name} version {result.registered_version}" if result.registered_version else ""))
    for note in result.notes:
        click.echo(f"loraflow: {note}")


main.add_command(make_sweep_command(settings_options, config_file_option, collect_settings))  # loraflow.sweep.command


if __name__ == "__main__":  # pragma: no cover
    main()
