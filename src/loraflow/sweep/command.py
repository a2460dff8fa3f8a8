"""The `loraflow sweep` command: every `train` option (fixed for all trials) plus the sweep's own.

Built by `make_command` from the CLI's own helpers (`loraflow.cli` passes them in), so its options
are generated from the settings dataclasses exactly as `train`'s are, and this package never
imports the CLI. Exit codes: 0 done, 1 tracking error or no trial finished, 2 bad option or search
space (before anything loads), 130 interrupted (resume with the same --study-name).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from loraflow import config
from loraflow.signals import exit_code
from loraflow.sweep import SweepInterrupted, SweepSettings, run_sweep, sweep_settings


def _flag(name: str) -> Callable:
    """A boolean that is a flag (`--spark`) or takes a value (`--spark false`, as MLproject passes it)."""
    return click.option(f"--{name}", type=click.BOOL, default=None, is_flag=False, flag_value=True,
                        help=config.field_help(SweepSettings)[name] + f" A flag, or --{name} true/false.")


def make_command(settings_options: Callable, config_file_option: Callable,
                 collect_settings: Callable[[str | None, dict[str, Any]], dict[str, Any]]) -> click.Command:
    """The `sweep` command, with the CLI's option generator, `--config` option and settings merger."""

    @click.command("sweep")
    @config_file_option
    @settings_options(config.LoraSettings, config.TrainSettings)
    @settings_options(SweepSettings, exclude=("spark", "promote"))
    @_flag("spark")
    @_flag("promote")
    def sweep(config_file: str | None, **options: Any) -> None:
        """Search LoRA settings with Optuna: each trial is a training run nested under the study's run.

        Every training option is fixed for all trials, except the settings the search space varies.
        The study lives in the tracking store: rerun with the same --study-name to resume it. Unless
        given, trials are short: --max-steps 30 --eval-steps 10 --eval-samples 0.
        """
        from loraflow.tracking import retry_briefly

        retry_briefly()
        names = config.field_names(SweepSettings)
        train_raw = collect_settings(config_file, {k: v for k, v in options.items() if k not in names})
        settings = sweep_settings({k: options[k] for k in names}, train_raw)  # a ConfigError: usage error, exit 2
        try:
            result = run_sweep(settings, train_raw)
        except SweepInterrupted as stop:
            click.echo(stop.result.summary())
            click.echo(f"loraflow: {stop}", err=True)
            raise SystemExit(exit_code("SIGINT")) from None
        click.echo(result.summary())
        if result.best is None:
            raise SystemExit(1)

    return sweep
