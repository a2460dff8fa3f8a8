"""The search space of a sweep: which settings vary, over what values, read from YAML and checked up front.

A space maps setting names (the same as `loraflow train`'s options, with underscores) to what each
may take:

    r: [4, 8, 16, 32, 64]                          # a list: one of these values
    lora_alpha: {multiple_of_r: [1, 2]}            # lora_alpha = r x one of these
    learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}   # a range (log-uniform with log: true)
    lora_dropout: {low: 0.0, high: 0.1}
    target_modules: [attention, all-linear]        # named module sets, or lists like "q_proj,v_proj"

Every value a space can produce is checked with the same rules as `loraflow train` before any
model loads (`check_space`): ranges at both ends, every choice, and every `lora_alpha` multiple with
every `r`. Nothing here imports Optuna at module level, so the CLI's `--help` stays fast.
"""

from __future__ import annotations

import difflib
import itertools
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraflow import config
from loraflow.errors import ConfigError
from loraflow.settings_file import load_yaml

ALPHA_MULTIPLE = "lora_alpha_per_r"
"""The Optuna parameter behind `lora_alpha: {multiple_of_r: [...]}` (lora_alpha itself is logged by the run)."""
NAMED_MODULES = {"attention": "q_proj,k_proj,v_proj,o_proj", "all-linear": config.ALL_LINEAR}
"""Named choices for `target_modules`: the attention projections, or every linear layer (peft's all-linear)."""
RANGE_KEYS = ("low", "high", "log", "step")
DEFAULT_SPACE: dict[str, Any] = {
    "r": [4, 8, 16, 32, 64],
    "lora_alpha": {"multiple_of_r": [1, 2]},
    "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
    "lora_dropout": {"low": 0.0, "high": 0.1},
    "target_modules": ["attention", "all-linear"],
}
"""The space searched without --search-space (docs/sweeps.md shows it as YAML)."""


@dataclass(frozen=True)
class Dimension:
    """One searched setting: a list of choices, or a numeric range."""

    name: str
    """The setting (a `LoraSettings` or `TrainSettings` field)."""
    choices: tuple[Any, ...] = ()
    """The values to choose from; empty for a range."""
    low: float | None = None
    """A range's lowest value (inclusive)."""
    high: float | None = None
    """A range's highest value (inclusive)."""
    log: bool = False
    """Sample the range log-uniformly (for learning rates)."""
    step: float | None = None
    """A range's step (integers default to 1)."""
    per_r: bool = False
    """`lora_alpha` only: `choices` are multiples of `r`."""

    @property
    def param(self) -> str:
        """The Optuna parameter name (and the MLflow param the storage logs on each trial run)."""
        return ALPHA_MULTIPLE if self.per_r else self.name

    def corners(self) -> tuple[Any, ...]:
        """The values that decide whether every value is valid: every choice, or both ends of a range."""
        return self.choices if self.choices or self.per_r else (self.low, self.high)


@dataclass(frozen=True)
class SearchSpace:
    """The searched settings, in file order."""

    dimensions: tuple[Dimension, ...]

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dimensions]

    def as_dict(self) -> dict[str, Any]:
        """The space in its YAML form (logged on the study's run)."""
        return {d.name: _as_yaml(d) for d in self.dimensions}


def _as_yaml(d: Dimension) -> Any:
    if d.per_r:
        return {"multiple_of_r": list(d.choices)}
    if d.choices:
        return list(d.choices)
    spec = {"low": d.low, "high": d.high}
    return {**spec, **({"log": True} if d.log else {}), **({"step": d.step} if d.step is not None else {})}


# ---------------------------------------------------------------------------------------------
# Parsing.


def _field_type(name: str) -> Any:
    for cls in (config.LoraSettings, config.TrainSettings):
        if name in config.field_names(cls):
            hint = config.field_type(cls, name)
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            return args[0] if len(args) == 1 else hint
    return None


def _known_names() -> list[str]:
    return config.field_names(config.LoraSettings) + config.field_names(config.TrainSettings)


def _parse_range(name: str, spec: Mapping[str, Any]) -> tuple[Dimension | None, list[str]]:
    unknown = [k for k in spec if k not in RANGE_KEYS]
    if unknown:
        return None, [f"search space `{name}`: unknown key {unknown[0]!r}; a range takes {', '.join(RANGE_KEYS)}, "
                      f"e.g. {{low: 1.0e-4, high: 1.0e-2, log: true}}"]
    problems = []
    numbers = {}
    for key in ("low", "high", "step"):
        value = spec.get(key)
        if value is None and key != "step":
            problems.append(f"search space `{name}`: a range needs `{key}`, e.g. {{low: 0.0, high: 0.1}}")
        elif value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            problems.append(f"search space `{name}`: `{key}` must be a number, got {value!r}")
        else:
            numbers[key] = value
    log = spec.get("log", False)
    if not isinstance(log, bool):
        problems.append(f"search space `{name}`: `log` must be true or false, got {log!r}")
    if problems:
        return None, problems
    low, high, step = numbers["low"], numbers["high"], numbers.get("step")
    if low > high:
        problems.append(f"search space `{name}`: `low` {low} is above `high` {high}; swap them")
    if log and low <= 0:
        problems.append(f"search space `{name}`: a log range needs `low` > 0, got {low}")
    if log and step is not None:
        problems.append(f"search space `{name}`: give `log` or `step`, not both")
    if step is not None and step <= 0:
        problems.append(f"search space `{name}`: `step` must be > 0, got {step}")
    if _field_type(name) is int and any(not float(v).is_integer() for v in (low, high, step or 1)):
        problems.append(f"search space `{name}` is an integer setting: `low`, `high` and `step` must be "
                        f"whole numbers, got low={low}, high={high}, step={step}")
    return Dimension(name, low=low, high=high, log=log, step=step), problems


def _parse_choices(name: str, values: list[Any]) -> tuple[Dimension | None, list[str]]:
    if not values:
        return None, [f"search space `{name}`: the list of choices is empty; give at least one value"]
    bad = [v for v in values if not isinstance(v, (str, int, float, bool))]
    if bad:
        return None, [f"search space `{name}`: choices must be single values (numbers, text), got {bad[0]!r}; "
                      "write a module list as one string, e.g. \"q_proj,v_proj\""]
    if len(set(map(repr, values))) != len(values):
        return None, [f"search space `{name}`: repeated choices in {values!r}"]
    return Dimension(name, choices=tuple(values)), []


def _parse_alpha(spec: Mapping[str, Any]) -> tuple[Dimension | None, list[str]]:
    multiples = spec.get("multiple_of_r")
    if set(spec) != {"multiple_of_r"} or not isinstance(multiples, list) or not multiples:
        return None, ["search space `lora_alpha`: give a list, a range, or {multiple_of_r: [1, 2]} "
                      f"(lora_alpha = r x each), got {dict(spec)!r}"]
    bad = [m for m in multiples if isinstance(m, bool) or not isinstance(m, (int, float)) or m <= 0]
    if bad:
        return None, [f"search space `lora_alpha`: `multiple_of_r` must hold positive numbers, got {bad[0]!r}"]
    return Dimension("lora_alpha", choices=tuple(multiples), per_r=True), []


def _parse_dimension(name: Any, spec: Any) -> tuple[Dimension | None, list[str]]:
    known = _known_names()
    if name not in known:
        close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
        hint = f" Did you mean `{close[0]}`?" if close else " Keys are `loraflow train` settings, e.g. r, learning_rate."
        return None, [f"search space: unknown setting `{name}`.{hint}"]
    if isinstance(spec, list):
        return _parse_choices(name, spec)
    if isinstance(spec, Mapping) and name == "lora_alpha" and "multiple_of_r" in spec:
        return _parse_alpha(spec)
    if isinstance(spec, Mapping):
        if _field_type(name) not in (int, float):
            return None, [f"search space `{name}` is not a number setting, so it takes a list of choices, "
                          f"not a range; got {dict(spec)!r}"]
        return _parse_range(name, spec)
    return None, [f"search space `{name}`: give a list of choices or a range {{low: ..., high: ...}}, got {spec!r}"]


def parse_space(raw: Mapping[str, Any]) -> SearchSpace:
    """A `SearchSpace` from its YAML mapping.

    Raises:
        ConfigError: every unknown setting, malformed range or empty choice list, at once.
    """
    if not raw:
        raise ConfigError("the search space is empty: name at least one setting to search, e.g. r: [8, 16]")
    dimensions, problems = [], []
    for name, spec in raw.items():
        dimension, found = _parse_dimension(name, spec)
        problems += found
        if dimension is not None:
            dimensions.append(dimension)
    if problems:
        raise ConfigError(problems)
    return SearchSpace(tuple(dimensions))


def load_space(path: str | Path | None) -> SearchSpace:
    """The space in a YAML file, or `DEFAULT_SPACE` without one.

    Raises:
        ConfigError: an unreadable or malformed file (one message for all its problems).
    """
    return parse_space(load_yaml(path) if path else DEFAULT_SPACE)


# ---------------------------------------------------------------------------------------------
# Checking every value up front, and turning a trial's values into settings.


def resolve(values: Mapping[str, Any], fixed: Mapping[str, Any]) -> dict[str, Any]:
    """The flat training settings of one trial: `fixed` with the trial's `values` (Optuna params) applied."""
    raw = dict(fixed)
    for name, value in values.items():
        if name == ALPHA_MULTIPLE:
            continue
        raw[name] = NAMED_MODULES.get(value, value) if name == "target_modules" else value
    if ALPHA_MULTIPLE in values:
        r = config.parse_settings({"r": raw.get("r", config.LoraSettings().r)})[0].r
        raw["lora_alpha"] = float(values[ALPHA_MULTIPLE]) * r
    return raw


def _corner_values(space: SearchSpace) -> list[dict[str, Any]]:
    """Every combination of each dimension's deciding values (`Dimension.corners`)."""
    dims = space.dimensions
    return [{d.param: v for d, v in zip(dims, combo)} for combo in itertools.product(*(d.corners() for d in dims))]


MAX_CORNERS = 4096  # beyond this many combinations, each dimension is checked on its own (still every value)


def check_space(space: SearchSpace, fixed: Mapping[str, Any], explicit: set[str]) -> None:
    """Refuse a space that can produce an invalid setting, before anything loads.

    Checks every combination of choices and range ends with `config.parse_settings` (the same rules
    as `loraflow train`), then the module names and ranks against the base model's skeleton
    (`lora.validate_settings`: no weights) for each `target_modules` choice with the largest `r`.

    Raises:
        ConfigError: naming each searched setting and the value that breaks a rule.
    """
    problems = [f"`{name}` is given as a fixed setting and is also in the search space; drop one of them"
                for name in space.names if name in explicit]
    lora_names = [n for n in space.names if n in config.field_names(config.LoraSettings)]
    if fixed.get("init_model") and lora_names:
        problems.append(f"`init_model` continues an adapter whose LoRA settings are its own, so the search space "
                        f"cannot vary {', '.join(lora_names)}: search training settings only, or drop init_model")
    combos = _corner_values(space)
    if len(combos) > MAX_CORNERS:
        combos = [{d.param: v} for d in space.dimensions for v in d.corners()]
    for values in combos:
        problems += _value_problems(values, fixed)
    if not problems:
        problems += _architecture_problems(space, fixed)
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))


def _value_problems(values: Mapping[str, Any], fixed: Mapping[str, Any]) -> list[str]:
    try:
        config.parse_settings(resolve(values, fixed))
    except ConfigError as err:
        shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
        return [f"the search space can produce an invalid setting ({shown}): {p}" for p in err.problems]
    return []


def _architecture_problems(space: SearchSpace, fixed: Mapping[str, Any]) -> list[str]:
    from loraflow.lora import validate_settings

    by_name = {d.name: d for d in space.dimensions}
    targets = by_name["target_modules"].choices if "target_modules" in by_name else (None,)
    r_dim = by_name.get("r")
    largest_r = max(r_dim.corners()) if r_dim else None
    problems = []
    for target in targets:
        values = {k: v for k, v in (("target_modules", target), ("r", largest_r)) if v is not None}
        try:
            validate_settings(resolve(values, fixed))
        except ConfigError as err:
            shown = ", ".join(f"{k}={v!r}" for k, v in values.items()) or "the fixed settings"
            problems += [f"the search space can produce an invalid setting ({shown}): {p}" for p in err.problems]
    return problems


def suggest(trial: Any, space: SearchSpace) -> dict[str, Any]:
    """Ask an Optuna trial for one value per dimension; returns the trial's params by name."""
    for d in space.dimensions:
        if d.choices:
            trial.suggest_categorical(d.param, list(d.choices))
        elif _field_type(d.name) is int:
            trial.suggest_int(d.name, int(d.low), int(d.high), step=int(d.step or 1), log=d.log)
        else:
            trial.suggest_float(d.name, d.low, d.high, step=d.step, log=d.log)
    return dict(trial.params)
