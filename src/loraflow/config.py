"""Typed, validated settings: LoRA settings and training settings, from one flat mapping (CLI
options, MLproject parameters, or a YAML file read by `loraflow.settings_file`).

Every setting is a field of a frozen dataclass whose `help` metadata is the one place it is
documented (the CLI and MLproject help are generated from it). The settings come in groups, as
LitGPT's TrainArgs/EvalArgs do: `LoraSettings`, and `TrainSettings` made of `ModelSettings`,
`DataSettings`, `OptimSettings`, `EvalSettings` and `TrackingSettings`; each group's rules are its
`problems`, beside its fields, and each consumer reads its own group. Names stay flat and unique
outside: options, MLproject parameters, YAML keys and logged params (`to_dict`).

Parsing collects *every* problem (unknown keys with a did-you-mean, unparsable strings,
out-of-range values) and raises one `ConfigError` listing them all, before any model or data is
loaded. Rules that need the model's architecture (module names, rank limits) are `loraflow.lora`'s.
This module also holds the one translation of our settings into `peft.LoraConfig` (`build_lora_config`).

Strings are accepted everywhere, because `mlflow run -P r=16` passes every parameter as a string:
`"16"`, `"0.05"`, `"true"`, `"q_proj,v_proj"` and `""` (unset) all parse.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from loraflow.errors import ConfigError
from loraflow.flavor.layout import parse_bool
from loraflow.flavor.quantization import QUANTIZATIONS, bitsandbytes_problem

logger = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"
BIASES = ("none", "all", "lora_only")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BASE_MODES = ("auto", "embedded", "logged", "reference")
OVERFLOWS = ("truncate", "drop")
TRAIN_ON = ("assistant", "last", "all")
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
LARGE_RANK = 256
MAX_TRAIN_SEED = 2**31 - 1  # numpy takes 32-bit seeds (accelerate's set_seed), and each process adds its index


def _help(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    return field(default=default, metadata={"help": text}, **kw)


@dataclass(frozen=True)
class LoraSettings:
    """How LoRA adapters are attached to the base model (maps one-to-one onto `peft.LoraConfig`)."""

    r: int = _help("LoRA rank: the inner dimension of the low-rank update BA. Typical: 8-64.", 16)
    lora_alpha: float = _help("Scaling numerator: the update is scaled by lora_alpha / r. Typical: 1-2 x r.", 32.0)
    lora_dropout: float = _help("Dropout on the LoRA input, 0 <= p < 1.", 0.05)
    target_modules: tuple[str, ...] | str = _help(
        "Module names to adapt, comma-separated (e.g. q_proj,v_proj), or 'all-linear'.",
        ("q_proj", "k_proj", "v_proj", "o_proj"),
    )
    bias: str = _help("Which biases to train: none, all or lora_only.", "none")
    task_type: str = _help("peft TaskType name.", "CAUSAL_LM")
    inference_mode: bool = _help("Freeze the adapter (for inference only).", False)
    use_rslora: bool = _help("Rank-stabilised LoRA: scale by lora_alpha / sqrt(r).", False)
    use_dora: bool = _help("Weight-decomposed LoRA (DoRA).", False)
    modules_to_save: tuple[str, ...] = _help(
        "Modules trained in full beside LoRA, comma-separated (e.g. a multimodal projector or lm_head).", ()
    )

    @staticmethod
    def problems(s: Mapping[str, Any]) -> list[str]:
        """What is wrong with already-parsed values of this group (the keys given)."""
        problems = []
        if "r" in s and s["r"] <= 0:
            problems.append(f"`r` must be a positive integer, got {s['r']} (typical: 8-64)")
        if "lora_alpha" in s and s["lora_alpha"] <= 0:
            problems.append(f"`lora_alpha` must be a positive number, got {s['lora_alpha']} (typical: 1-2 x r)")
        if "lora_dropout" in s and not 0 <= s["lora_dropout"] < 1:
            problems.append(f"`lora_dropout` must be >= 0 and < 1, got {s['lora_dropout']}")
        if "target_modules" in s and s["target_modules"] != ALL_LINEAR and not s["target_modules"]:
            problems.append("`target_modules` must name at least one module (e.g. q_proj,v_proj) or be 'all-linear', got an empty list")
        problems += _choice_problems(s, (("bias", BIASES), ("task_type", TASK_TYPES)))
        for name in ("target_modules", "modules_to_save"):
            value = s.get(name)
            if isinstance(value, tuple) and any(not v for v in value):
                problems.append(f"`{name}` has an empty module name in {list(value)!r}")
        return problems


@dataclass(frozen=True)
class ModelSettings:
    """The base model, and how its frozen weights are held."""

    base_model: str = _help("Base model: 'builtin:tiny' (offline default), a local directory or a Hub id.", "builtin:tiny")
    revision: str | None = _help("Hub revision (branch, tag or commit) of base_model.", None)
    trust_remote_code: bool = _help("Allow code shipped with the base model to run. Off unless you ask.", False)
    precision: str = _help("The dtype the frozen base is held and computes in, whatever it was saved in (the "
                           "adapter stays fp32): auto (fp32 on a CPU; bf16 on a GPU that has it, else fp16), "
                           "fp32, bf16 or fp16 (GPU only). See loraflow.flavor.dtypes.", "auto")
    quantization: str = _help("Quantize the frozen base (QLoRA) through bitsandbytes: none, nf4, fp4 or int8. 4-bit "
                              "computes in `precision`'s dtype. Needs pip install 'loraflow[quantization]'.", "none")
    init_model: str | None = _help("A logged loraflow model URI to continue training from (models:/NAME@champion).", None)

    @staticmethod
    def problems(s: Mapping[str, Any]) -> list[str]:
        """What is wrong with already-parsed values of this group (the keys given)."""
        problems = _choice_problems(s, (("precision", PRECISIONS), ("quantization", QUANTIZATIONS)))
        if s.get("quantization") in QUANTIZATIONS[1:] and (problem := bitsandbytes_problem()):
            problems.append(f"`quantization` {s['quantization']} {problem}")
        return problems


@dataclass(frozen=True)
class DataSettings:
    """What to train and evaluate on, and how examples become token rows."""

    train_data: str | None = _help("Training data (.csv, .jsonl or .parquet). Empty: the bundled sample.", None)
    eval_data: str | None = _help("Evaluation data. Empty: a seeded split of train_data (eval_fraction).", None)
    eval_fraction: float = _help("Share of train_data held out for evaluation when eval_data is empty.", 0.1)
    text_column: str | None = _help("Column of plain text to train on (instead of prompt + completion).", None)
    prompt_column: str | None = _help("Prompt column; its tokens are masked from the loss. Default: 'prompt'.", None)
    completion_column: str | None = _help("Completion column; the loss is computed on it. Default: 'completion'.", None)
    messages_column: str | None = _help(
        "Column of conversations (OpenAI `messages`: lists of {role, content}). Default: 'messages' when the "
        "data has that column and no text/prompt/completion column is named.", None)
    chat_template: str = _help("Chat template for conversations: auto (the tokenizer's own), chatml, or a .jinja file.",
                               "auto")
    train_on: str = _help("Where the loss falls in conversations: assistant (every reply and its end-of-turn "
                          "token), last (the last reply) or all (every token).", "assistant")
    max_seq_length: int = _help("Longest example in tokens; longer ones are handled by `overflow`.", 256)
    overflow: str = _help("What to do with examples longer than max_seq_length: truncate or drop.", "truncate")
    packing: bool = _help("Pack several examples per row (no cross-example attention) instead of padding.", False)

    @staticmethod
    def problems(s: Mapping[str, Any]) -> list[str]:
        """What is wrong with already-parsed values of this group (the keys given)."""
        problems = _positive_problems(s, ("max_seq_length",))
        if "eval_fraction" in s and not 0 < s["eval_fraction"] < 1:
            problems.append(f"`eval_fraction` must be > 0 and < 1, got {s['eval_fraction']}")
        problems += _choice_problems(s, (("overflow", OVERFLOWS), ("train_on", TRAIN_ON)))
        problems += column_problems(s.get("text_column"), s.get("prompt_column"), s.get("completion_column"))
        if s.get("messages_column") and any(s.get(k) for k in ("text_column", "prompt_column", "completion_column")):
            problems.append("give either `messages_column` (conversations), or `text_column`, or `prompt_column` + "
                            "`completion_column`, not several")
        return problems


@dataclass(frozen=True)
class OptimSettings:
    """How long and how hard to train: the loop, the optimizer and its schedule."""

    max_steps: int = _help("Optimizer steps to run; 0 means use `epochs`.", 300)
    epochs: float = _help("Passes over the training data, used when max_steps is 0.", 1.0)
    batch_size: int = _help("Examples per batch (per process); see micro_batch_tokens.", 8)
    grad_accum_steps: int = _help("Batches accumulated per optimizer step.", 1)
    micro_batch_tokens: int = _help(
        "Run each batch in parts of at most this many padded tokens, accumulating their gradients (same "
        "update, less activation memory). 0: auto (1024 on CPU, no split on GPU).", 0)
    learning_rate: float = _help("Peak AdamW learning rate.", 2e-3)
    weight_decay: float = _help("AdamW weight decay.", 0.0)
    warmup_ratio: float = _help("Share of steps spent in linear warmup, 0 <= x < 1; then cosine decay.", 0.1)
    max_grad_norm: float = _help("Clip the gradient norm to this; 0 disables clipping.", 1.0)
    seed: int = _help("Random seed for init, data order and dropout (each process's dropout: seed + its index).", 42)
    checkpoint_steps: int = _help("Write a resumable checkpoint every N optimizer steps; 0 disables.", 0)

    @staticmethod
    def problems(s: Mapping[str, Any]) -> list[str]:
        """What is wrong with already-parsed values of this group (the keys given)."""
        problems = _positive_problems(s, ("batch_size", "grad_accum_steps"))
        for name in ("max_steps", "checkpoint_steps", "max_grad_norm", "weight_decay", "micro_batch_tokens"):
            if name in s and s[name] < 0:
                problems.append(f"`{name}` must be >= 0, got {s[name]}")
        if "learning_rate" in s and not 0 < s["learning_rate"] < 1:
            problems.append(f"`learning_rate` must be > 0 and < 1, got {s['learning_rate']} "
                            "(typical for LoRA: 1e-4 to 3e-3)")
        if "warmup_ratio" in s and not 0 <= s["warmup_ratio"] < 1:
            problems.append(f"`warmup_ratio` must be >= 0 and < 1, got {s['warmup_ratio']}")
        if "epochs" in s and s["epochs"] <= 0:
            problems.append(f"`epochs` must be a positive number, got {s['epochs']}")
        if "seed" in s and not 0 <= s["seed"] <= MAX_TRAIN_SEED:
            problems.append(f"`seed` must be in 0..{MAX_TRAIN_SEED}, got {s['seed']}")
        return problems


@dataclass(frozen=True)
class EvalSettings:
    """When the run evaluates, and what it measures beside the loss."""

    eval_steps: int = _help("Evaluate every N optimizer steps (also at step 0 and at the end).", 50)
    eval_samples: int = _help("Eval rows answered greedily at each evaluation, scored by exact match and token F1 "
                              "(logged with a table of samples); 0 turns it off.", 64)

    @staticmethod
    def problems(s: Mapping[str, Any]) -> list[str]:
        """What is wrong with already-parsed values of this group (the keys given)."""
        problems = _positive_problems(s, ("eval_steps",))
        if "eval_samples" in s and s["eval_samples"] < 0:
            problems.append(f"`eval_samples` must be >= 0, got {s['eval_samples']}")
        return problems


@dataclass(frozen=True)
class TrackingSettings:
    """Tracking and packaging: how the run is named, and where the model and its checkpoints go."""

    registered_model_name: str | None = _help("Register the logged model under this name. Empty: do not register.", None)
    run_name: str | None = _help("MLflow run name. Empty: named from what is trained, e.g. lora-r16-tiny-qa.", None)
    base_mode: str = _help("How the logged model holds its base: auto (a local folder or GGUF file logged once "
                           "per fingerprint, a Hub id referenced), embedded, logged or reference.", "auto")
    output_dir: str = _help("Local folder for checkpoints and the fallback copy of the model.", "outputs")

    @staticmethod
    def problems(s: Mapping[str, Any]) -> list[str]:
        """What is wrong with already-parsed values of this group (the keys given)."""
        return _choice_problems(s, (("base_mode", BASE_MODES),))


@dataclass(frozen=True)
class TrainSettings:
    """Everything but LoRA, in groups; each consumer reads its own group.

    The groups' field names are flat and unique: CLI options, MLproject parameters, YAML keys and
    the logged params all use them ungrouped (`to_dict`, `TrainSettings.from_flat`).
    """

    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)

    @classmethod
    def from_flat(cls, values: Mapping[str, Any] | None = None, /, **more: Any) -> "TrainSettings":
        """Group already-parsed flat values (`max_steps=2`, ...); an unknown name is a TypeError."""
        flat = {**(values or {}), **more}
        if unknown := [name for name in flat if name not in field_names(cls)]:
            raise TypeError(f"TrainSettings has no setting {', '.join(unknown)}")
        return cls(**{f.name: group(**{k: v for k, v in flat.items() if k in field_names(group)})
                      for f, group in zip(dataclasses.fields(cls), groups(cls))})


def groups(cls: type) -> list[type]:
    """The groups of a settings class (`TrainSettings`: model, data, optim, eval, tracking); a group is its own."""
    hints = typing.get_type_hints(cls)
    if all(dataclasses.is_dataclass(hints[f.name]) for f in dataclasses.fields(cls)):
        return [hints[f.name] for f in dataclasses.fields(cls)]
    return [cls]


def field_help(cls: type) -> dict[str, str]:
    """Field name -> one-line help, for the CLI and docs (a grouped class's fields, flat)."""
    return {f.name: f.metadata["help"] for group in groups(cls) for f in dataclasses.fields(group)}


def field_names(cls: type) -> list[str]:
    return list(field_help(cls))


def field_type(cls: type, name: str) -> Any:
    """The annotation of the flat setting `name` of `cls` (in whichever group holds it)."""
    return next(typing.get_type_hints(group)[name] for group in groups(cls) if name in field_names(group))


def field_default(cls: type, name: str) -> Any:
    """The default of the flat setting `name` of `cls`."""
    return next(getattr(group(), name) for group in groups(cls) if name in field_names(group))


# ---------------------------------------------------------------------------------------------
# Parsing: one converter per annotation, each returning (value, problem-or-None).


def _is_unset(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


def _parse_bool(name: str, value: Any) -> tuple[Any, str | None]:
    parsed = parse_bool(value)
    if parsed is None:
        return value, f"`{name}` must be a boolean (true/false), got {value!r}"
    return parsed, None


def _parse_int(name: str, value: Any) -> tuple[Any, str | None]:
    if isinstance(value, bool):
        return value, f"`{name}` must be an integer, got {value!r}"
    if isinstance(value, int):
        return value, None
    if isinstance(value, float) and value.is_integer():
        return int(value), None
    try:
        return int(str(value).strip()), None
    except ValueError:
        try:
            as_float = float(str(value).strip())
        except ValueError:
            as_float = math.nan
        if math.isfinite(as_float) and as_float.is_integer():
            return int(as_float), None
    return value, f"`{name}` must be an integer, got {value!r}"


def _parse_float(name: str, value: Any) -> tuple[Any, str | None]:
    if isinstance(value, bool):
        return value, f"`{name}` must be a number, got {value!r}"
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        return value, f"`{name}` must be a number, got {value!r}"
    if not math.isfinite(number):
        return value, f"`{name}` must be a finite number, got {value!r}"
    return number, None


def _parse_str_list(name: str, value: Any) -> tuple[Any, str | None]:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip()), None
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, str) for v in value):
            return tuple(v.strip() for v in value), None
        bad = [v for v in value if not isinstance(v, str)]
        return value, f"`{name}` must be a list of strings, got non-string items {bad!r}"
    return value, f"`{name}` must be a comma-separated string or a list of strings, got {value!r}"


def _parse_target_modules(name: str, value: Any) -> tuple[Any, str | None]:
    if isinstance(value, str) and value.strip().lower() == ALL_LINEAR:
        return ALL_LINEAR, None
    # YAML users write `target_modules: [all-linear]`; peft only understands the bare string
    if isinstance(value, (list, tuple)) and len(value) == 1 and str(value[0]).strip().lower() == ALL_LINEAR:
        return ALL_LINEAR, None
    return _parse_str_list(name, value)


def _parse_str(name: str, value: Any) -> tuple[Any, str | None]:
    if isinstance(value, str):
        return value.strip(), None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value), None
    return value, f"`{name}` must be a string, got {value!r}"


def _converter(cls: type, name: str):
    if cls is LoraSettings and name == "target_modules":
        return _parse_target_modules
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if isinstance(hint, types.UnionType) and len(args) == 1 else hint
    if base is bool:
        return _parse_bool
    if base is int:
        return _parse_int
    if base is float:
        return _parse_float
    if typing.get_origin(base) is tuple:
        return _parse_str_list
    return _parse_str


def _optional(cls: type, name: str) -> bool:
    return type(None) in typing.get_args(typing.get_type_hints(cls)[name])


def _unknown_key_problem(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" Did you mean `{close[0]}`?" if close else f" Known settings: {', '.join(known)}."
    return f"unknown setting `{key}`.{hint}"


def _parse_fields(cls: type, raw: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    values: dict[str, Any] = {}
    problems: list[str] = []
    for name, value in raw.items():
        if _is_unset(value):
            if _optional(cls, name):
                values[name] = None
            elif typing.get_origin(typing.get_type_hints(cls)[name]) is tuple:
                values[name] = ()
            continue  # an empty MLproject string means "use the default"
        parsed, problem = _converter(cls, name)(name, value)
        if problem:
            problems.append(problem)
        else:
            values[name] = parsed
    return values, problems


# ---------------------------------------------------------------------------------------------
# Rules the groups share (each group's own rules are its `problems`, beside its fields).


def column_problems(text: str | None, prompt: str | None, completion: str | None, *, resolved: bool = False) -> list[str]:
    """The rule for which columns hold the training text: `text`, or `prompt` + `completion`.

    `resolved`: the defaults were applied already, so one of the two choices must be complete.
    """
    if text and (prompt or completion):
        return ["give either `text_column`, or `prompt_column` + `completion_column`, not both"]
    if bool(prompt) != bool(completion):
        return ["`prompt_column` and `completion_column` go together: give both, or neither (default: prompt, completion)"]
    if resolved and not text and not prompt:
        return ["give `text_column`, or both `prompt_column` and `completion_column`"]
    return []


def _choice_problem(name: str, value: Any, choices: tuple[str, ...]) -> str:
    lowered = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(str(value).lower(), list(lowered), n=1, cutoff=0.5)
    hint = f" Did you mean {lowered[close[0]]!r}?" if close else ""
    return f"`{name}` must be one of {', '.join(choices)}; got {value!r}.{hint}"


def _positive_problems(s: Mapping[str, Any], names: tuple[str, ...]) -> list[str]:
    return [f"`{name}` must be a positive integer, got {s[name]}" for name in names if name in s and s[name] <= 0]


def _choice_problems(s: Mapping[str, Any], choices: tuple[tuple[str, tuple[str, ...]], ...]) -> list[str]:
    return [_choice_problem(name, s[name], allowed) for name, allowed in choices if name in s and s[name] not in allowed]


# ---------------------------------------------------------------------------------------------
# Public entry points.


def parse_settings(raw: Mapping[str, Any]) -> tuple[LoraSettings, TrainSettings]:
    """Build both settings objects from one flat mapping (CLI options, MLproject params, YAML).

    Raises:
        ConfigError: listing every unknown key, unparsable value and broken rule at once.
    """
    known = field_names(LoraSettings) + field_names(TrainSettings)
    problems = [_unknown_key_problem(k, known) for k in raw if k not in known]
    parsed = [(group, *_parse_fields(group, {k: v for k, v in raw.items() if k in field_names(group)}))
              for group in [LoraSettings, *groups(TrainSettings)]]
    problems += [problem for _, _, parse_problems in parsed for problem in parse_problems]
    problems += [problem for group, values, _ in parsed for problem in group.problems(values)]
    if problems:
        raise ConfigError(problems)
    lora, *train_groups = (group(**values) for group, values, _ in parsed)
    _warn_unusual(lora)
    return lora, TrainSettings(*train_groups)


def lora_settings(raw: Mapping[str, Any] | None = None, **overrides: Any) -> LoraSettings:
    """Validated `LoraSettings` from a mapping of LoRA keys only (unknown keys are errors)."""
    merged = {**(raw or {}), **overrides}
    lora_names = field_names(LoraSettings)
    problems = [_unknown_key_problem(k, lora_names) for k in merged if k not in lora_names]
    values, parse_problems = _parse_fields(LoraSettings, {k: v for k, v in merged.items() if k in lora_names})
    problems += parse_problems + LoraSettings.problems(values)
    if problems:
        raise ConfigError(problems)
    settings = LoraSettings(**values)
    _warn_unusual(settings)
    return settings


def to_dict(settings: Any) -> dict[str, Any]:
    """Plain, YAML/JSON-friendly dict (tuples become lists); a grouped `TrainSettings` comes out flat."""
    flat: dict[str, Any] = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if dataclasses.is_dataclass(value):
            flat.update(to_dict(value))
        else:
            flat[f.name] = list(value) if isinstance(value, tuple) else value
    return flat


def build_lora_config(settings: LoraSettings):
    """Our settings as a `peft.LoraConfig`: the one place they meet peft's."""
    from peft import LoraConfig

    kwargs = to_dict(settings)
    kwargs["modules_to_save"] = kwargs["modules_to_save"] or None
    return LoraConfig(**kwargs)


def lora_settings_of(peft_config: Any) -> LoraSettings:
    """The `LoraSettings` a `peft.LoraConfig` holds: `build_lora_config` the other way round."""
    names = field_names(LoraSettings)
    return lora_settings({n: _peft_value(getattr(peft_config, n)) for n in names if hasattr(peft_config, n)})


def _peft_value(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return tuple(sorted(value))
    if hasattr(value, "value"):  # peft's TaskType enum
        return value.value
    return value if value is not None else ()


def _warn_unusual(settings: LoraSettings) -> None:
    if settings.r > LARGE_RANK:
        logger.warning("`r`=%d is unusually large (> %d): LoRA rarely gains above 64-128, and memory grows with r",
                       settings.r, LARGE_RANK)
