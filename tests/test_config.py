"""Tests for loraflow.config: typed LoRA and training settings, every rule, one error for all problems."""

from __future__ import annotations

import dataclasses
import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraflow import ConfigError
from loraflow.config import (
    ALL_LINEAR,
    TASK_TYPES,
    LoraSettings,
    TrainSettings,
    field_help,
    groups,
    lora_settings,
    parse_settings,
    to_dict,
    build_lora_config,
)
from loraflow.settings_file import load_yaml


def problems_of(raw=None, **kw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        lora_settings(raw, **kw)
    return info.value.problems


def only_problem(**kw) -> str:
    problems = problems_of(**kw)
    assert len(problems) == 1, problems
    return problems[0]


# ---------------------------------------------------------------------------------------------
# Defaults and the error type


def test_defaults_match_the_documented_contract():
    s = lora_settings()
    assert s == LoraSettings()
    assert s.task_type == "CAUSAL_LM"
    assert s.inference_mode is False
    assert s.use_rslora is False and s.use_dora is False
    assert s.bias == "none"
    assert s.modules_to_save == ()
    assert s.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        LoraSettings().r = 4  # type: ignore[misc]


def test_config_error_is_a_value_error_listing_every_problem():
    err = ConfigError(["first", "second"])
    assert isinstance(err, ValueError)
    assert err.problems == ["first", "second"]
    assert "2 problems" in str(err) and "first" in str(err) and "second" in str(err)
    assert ConfigError("only").problems == ["only"]


def test_every_field_has_help_text():
    for cls in (LoraSettings, *groups(TrainSettings)):
        helps = field_help(cls)
        assert set(helps) == {f.name for f in dataclasses.fields(cls)}
        assert all(text.strip() for text in helps.values())


def test_task_types_are_exactly_peft_task_type_names():
    from peft import TaskType

    assert set(TASK_TYPES) == {t.name for t in TaskType}


# ---------------------------------------------------------------------------------------------
# r


@pytest.mark.parametrize("value, expected", [(8, 8), ("16", 16), (" 32 ", 32), ("16.0", 16), (64.0, 64), ("1e2", 100)])
def test_r_accepts_integers_and_integer_strings(value, expected):
    assert lora_settings(r=value).r == expected


@pytest.mark.parametrize("value", [0, -1, "0", "-8"])
def test_r_must_be_positive(value):
    problem = only_problem(r=value)
    assert problem.startswith("`r` must be a positive integer")
    assert str(int(value)) in problem
    assert "typical" in problem


@pytest.mark.parametrize("value", ["abc", 1.5, "2.5", True, float("inf"), [8]])
def test_r_rejects_non_integers(value):
    problem = only_problem(r=value)
    assert "`r` must be an integer" in problem
    assert repr(value) in problem


def test_r_above_256_is_accepted_with_a_logged_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="loraflow.config"):
        assert lora_settings(r=512).r == 512
    warnings = [rec for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "512" in warnings[0].getMessage() and "256" in warnings[0].getMessage()


def test_r_of_256_does_not_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="loraflow.config"):
        lora_settings(r=256)
    assert not [rec for rec in caplog.records if rec.name == "loraflow.config"]


# ---------------------------------------------------------------------------------------------
# lora_alpha, lora_dropout


@pytest.mark.parametrize("value, expected", [(16, 16.0), ("8", 8.0), ("0.5", 0.5), (1e-3, 1e-3)])
def test_lora_alpha_accepts_positive_numbers(value, expected):
    s = lora_settings(lora_alpha=value)
    assert s.lora_alpha == expected and isinstance(s.lora_alpha, float)


@pytest.mark.parametrize("value", [0, -1, "-0.5", 0.0])
def test_lora_alpha_must_be_positive_although_peft_accepts_it(value):
    from peft import LoraConfig

    LoraConfig(lora_alpha=float(value))  # peft itself does not object
    problem = only_problem(lora_alpha=value)
    assert "`lora_alpha` must be a positive number" in problem
    assert str(float(value)) in problem


@pytest.mark.parametrize("value", ["nan", "inf", float("nan"), "-inf"])
def test_lora_alpha_must_be_finite(value):
    assert "`lora_alpha` must be a finite number" in only_problem(lora_alpha=value)


@pytest.mark.parametrize("value", ["big", [1], True])
def test_lora_alpha_rejects_non_numbers(value):
    problem = only_problem(lora_alpha=value)
    assert "`lora_alpha` must be a number" in problem and repr(value) in problem


@pytest.mark.parametrize("value", [0, 0.0, "0", 0.5, "0.999"])
def test_lora_dropout_accepts_zero_up_to_below_one(value):
    assert lora_settings(lora_dropout=value).lora_dropout == float(value)


@pytest.mark.parametrize("value", [1, 1.0, "2", -0.1, "-1e-9"])
def test_lora_dropout_must_be_in_zero_one(value):
    problem = only_problem(lora_dropout=value)
    assert problem == f"`lora_dropout` must be >= 0 and < 1, got {float(value)}"


def test_lora_dropout_unparsable_string():
    assert "`lora_dropout` must be a number, got 'lots'" in only_problem(lora_dropout="lots")


# ---------------------------------------------------------------------------------------------
# target_modules, modules_to_save


@pytest.mark.parametrize(
    "value, expected",
    [
        ("q_proj,v_proj", ("q_proj", "v_proj")),
        (" q_proj , v_proj ", ("q_proj", "v_proj")),
        ("q_proj", ("q_proj",)),
        (["q_proj", "v_proj"], ("q_proj", "v_proj")),
        (("k_proj",), ("k_proj",)),
        ("all-linear", ALL_LINEAR),
        ("ALL-LINEAR", ALL_LINEAR),
        (["all-linear"], ALL_LINEAR),  # YAML list form
    ],
)
def test_target_modules_parses_strings_and_lists(value, expected):
    assert lora_settings(target_modules=value).target_modules == expected


@pytest.mark.parametrize("value", [[], (), ",", " , ,"])
def test_target_modules_must_not_be_empty(value):
    problem = only_problem(target_modules=value)
    assert "`target_modules` must name at least one module" in problem
    assert "all-linear" in problem


@pytest.mark.parametrize("value", ["", None])
def test_target_modules_unset_means_the_default(value):
    assert lora_settings(target_modules=value).target_modules == LoraSettings().target_modules


def test_target_modules_rejects_non_strings():
    problem = only_problem(target_modules=["q_proj", 3])
    assert "`target_modules` must be a list of strings" in problem and "[3]" in problem
    assert "`target_modules` must be a comma-separated string or a list of strings, got 7" in only_problem(
        target_modules=7
    )


@pytest.mark.parametrize("field", ["target_modules", "modules_to_save"])
def test_empty_module_name_inside_a_list_is_reported(field):
    problem = only_problem(**{field: ["q_proj", "  "]})
    assert f"`{field}` has an empty module name" in problem


def test_modules_to_save_parses_strings_and_lists():
    assert lora_settings(modules_to_save="lm_head, projector").modules_to_save == ("lm_head", "projector")
    assert lora_settings(modules_to_save=["lm_head"]).modules_to_save == ("lm_head",)
    assert lora_settings(modules_to_save="").modules_to_save == ()
    assert "`modules_to_save` must be" in only_problem(modules_to_save=5)


# ---------------------------------------------------------------------------------------------
# bias, task_type, booleans


@pytest.mark.parametrize("value", ["none", "all", "lora_only", " all "])
def test_bias_choices(value):
    assert lora_settings(bias=value).bias == value.strip()


def test_bias_outside_choices_is_reported_with_did_you_mean():
    problem = only_problem(bias="lora-only")
    assert "`bias` must be one of none, all, lora_only" in problem
    assert "'lora-only'" in problem and "Did you mean 'lora_only'?" in problem
    assert "`bias` must be a string" in only_problem(bias=["none"])


@pytest.mark.parametrize("value", TASK_TYPES)
def test_task_type_accepts_every_peft_name(value):
    assert lora_settings(task_type=value).task_type == value


def test_task_type_outside_choices_is_reported():
    problem = only_problem(task_type="CAUSAL")
    assert "`task_type` must be one of" in problem and "CAUSAL_LM" in problem
    assert "'CAUSAL'" in problem and "Did you mean 'CAUSAL_LM'?" in problem


@pytest.mark.parametrize("field", ["inference_mode", "use_rslora", "use_dora"])
@pytest.mark.parametrize(
    "text, expected",
    [(True, True), (False, False), ("true", True), ("False", False), ("1", True), ("0", False), ("yes", True), ("off", False)],
)
def test_booleans_parse_from_strings(field, text, expected):
    assert getattr(lora_settings(**{field: text}), field) is expected


@pytest.mark.parametrize("field", ["inference_mode", "use_rslora", "use_dora"])
@pytest.mark.parametrize("value", ["maybe", "2", 2, [True]])
def test_booleans_reject_unparsable_values(field, value):
    problem = only_problem(**{field: value})
    assert problem == f"`{field}` must be a boolean (true/false), got {value!r}"


# ---------------------------------------------------------------------------------------------
# Unknown keys, collecting all problems


def test_unknown_key_gets_did_you_mean():
    problem = only_problem(lora_alpah=16)
    assert problem == "unknown setting `lora_alpah`. Did you mean `lora_alpha`?"


def test_unknown_key_without_a_close_match_lists_known_settings():
    problem = only_problem(zzzzzz=1)
    assert "unknown setting `zzzzzz`" in problem and "Known settings: r, lora_alpha" in problem


def test_lora_settings_rejects_training_keys():
    assert "unknown setting `learning_rate`" in only_problem(learning_rate=0.1)


def test_every_problem_of_a_multiply_bad_config_is_in_one_error():
    problems = problems_of(
        {
            "r": 0,
            "lora_alpha": -2,
            "lora_dropout": "1.5",
            "target_modules": [],
            "bias": "some",
            "task_type": "LM",
            "inference_mode": "perhaps",
            "use_rslora": "nah",
            "use_dora": 7,
            "modules_to_save": 3,
            "dropout": 0.1,
        }
    )
    fields = ["r", "lora_alpha", "lora_dropout", "target_modules", "bias", "task_type", "inference_mode",
              "use_rslora", "use_dora", "modules_to_save", "dropout"]
    assert len(problems) == len(fields)
    for name in fields:
        assert any(f"`{name}`" in p for p in problems), name


def test_overrides_win_over_the_mapping():
    assert lora_settings({"r": 4, "lora_alpha": 8}, r=32).r == 32


# ---------------------------------------------------------------------------------------------
# Conversion to peft and to plain dicts


def test_build_lora_config_builds_a_matching_lora_config():
    from peft import TaskType

    s = lora_settings(r="8", lora_alpha="16", target_modules="q_proj,v_proj", use_rslora="true",
                      modules_to_save="lm_head", task_type="CAUSAL_LM")
    cfg = build_lora_config(s)
    assert cfg.r == 8 and cfg.lora_alpha == 16.0 and cfg.use_rslora is True
    assert set(cfg.target_modules) == {"q_proj", "v_proj"}
    assert list(cfg.modules_to_save) == ["lm_head"]
    assert cfg.task_type == TaskType.CAUSAL_LM
    assert build_lora_config(LoraSettings()).modules_to_save is None


def test_to_dict_is_plain_lists_and_round_trips():
    s = lora_settings(target_modules="q_proj,v_proj", modules_to_save="lm_head")
    d = to_dict(s)
    assert d["target_modules"] == ["q_proj", "v_proj"] and d["modules_to_save"] == ["lm_head"]
    assert lora_settings(d) == s


# ---------------------------------------------------------------------------------------------
# YAML


def test_yaml_file_builds_settings(tmp_path):
    path = tmp_path / "lora.yaml"
    path.write_text("r: 8\nlora_alpha: 16\ntarget_modules: [q_proj, v_proj]\nuse_dora: 'true'\n")
    s = lora_settings(load_yaml(path))
    assert (s.r, s.lora_alpha, s.target_modules, s.use_dora) == (8, 16.0, ("q_proj", "v_proj"), True)


def test_empty_yaml_file_is_an_empty_mapping(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_yaml(path) == {}


@pytest.mark.parametrize(
    "text, message",
    [("- r\n- 8\n", "must hold a mapping of settings, got list"), ("r: [8\n", "is not valid YAML")],
)
def test_bad_yaml_files_are_config_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_yaml(path)
    assert str(path) in str(info.value)


def test_missing_yaml_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        load_yaml(tmp_path / "nope.yaml")


# ---------------------------------------------------------------------------------------------
# parse_settings and the TrainSettings rules


def test_parse_settings_splits_one_flat_mapping():
    lora, train = parse_settings({"r": "8", "learning_rate": "1e-3", "packing": "true", "revision": ""})
    assert lora.r == 8
    assert train.optim.learning_rate == 1e-3 and train.data.packing is True and train.model.revision is None


def test_train_settings_are_grouped_inside_and_flat_outside():
    names = [name for group in groups(TrainSettings) for name in field_help(group)]
    assert len(names) == len(set(names)) == 35  # one flat namespace: options, MLproject params, YAML keys
    flat = {"max_steps": 2, "base_model": "x", "eval_samples": 0, "packing": True, "run_name": "n"}
    train = TrainSettings.from_flat(flat)
    assert (train.optim.max_steps, train.model.base_model, train.eval.eval_samples, train.data.packing,
            train.tracking.run_name) == (2, "x", 0, True, "n")
    assert TrainSettings.from_flat(to_dict(train)) == train and list(to_dict(train)) == names
    assert parse_settings({k: str(v) for k, v in flat.items()})[1] == train
    with pytest.raises(TypeError, match="max_step"):
        TrainSettings.from_flat(max_step=2)


def test_parse_settings_defaults():
    lora, train = parse_settings({})
    assert lora == LoraSettings() and train == TrainSettings()


@pytest.mark.parametrize("name", ["max_seq_length", "batch_size", "grad_accum_steps", "eval_steps"])
@pytest.mark.parametrize("value", [0, -3])
def test_train_positive_integers(name, value):
    with pytest.raises(ConfigError) as info:
        parse_settings({name: value})
    assert info.value.problems == [f"`{name}` must be a positive integer, got {value}"]


@pytest.mark.parametrize("name", ["max_steps", "checkpoint_steps", "max_grad_norm", "weight_decay", "micro_batch_tokens"])
def test_train_non_negative(name):
    parse_settings({name: 0})
    with pytest.raises(ConfigError) as info:
        parse_settings({name: -1})
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith(f"`{name}` must be >= 0")


@pytest.mark.parametrize(
    "name, bad, good",
    [
        ("learning_rate", [0, 1, -1e-4], [1e-4, 0.5]),
        ("warmup_ratio", [1, -0.1], [0, 0.5]),
        ("eval_fraction", [0, 1], [0.01, 0.5]),
        ("epochs", [0, -1], [0.5, 3]),
        ("seed", [-1, 2**31, 2**32], [0, 2**31 - 1]),  # numpy's seeds are 32-bit, and each process adds its index
    ],
)
def test_train_ranges(name, bad, good):
    for value in good:
        assert to_dict(parse_settings({name: value})[1])[name] == value
    for value in bad:
        with pytest.raises(ConfigError) as info:
            parse_settings({name: value})
        assert len(info.value.problems) == 1 and f"`{name}` must be" in info.value.problems[0]


@pytest.mark.parametrize(
    "name, good, typo, suggestion",
    [("precision", "bf16", "bf61", "bf16"), ("base_mode", "embedded", "embeded", "embedded"),
     ("overflow", "drop", "trunc", "truncate")],
)
def test_train_choices(name, good, typo, suggestion):
    assert to_dict(parse_settings({name: good})[1])[name] == good
    with pytest.raises(ConfigError) as info:
        parse_settings({name: typo})
    assert f"Did you mean '{suggestion}'?" in info.value.problems[0] and repr(typo) in info.value.problems[0]


def test_train_column_rules():
    assert parse_settings({"text_column": "body"})[1].data.text_column == "body"
    assert parse_settings({"prompt_column": "q", "completion_column": "a"})[1].data.prompt_column == "q"
    with pytest.raises(ConfigError, match="not both"):
        parse_settings({"text_column": "body", "prompt_column": "q", "completion_column": "a"})
    with pytest.raises(ConfigError, match="go together"):
        parse_settings({"prompt_column": "q"})


def test_train_type_errors():
    with pytest.raises(ConfigError) as info:
        parse_settings({"batch_size": "eight", "trust_remote_code": "sure", "learning_rate": "fast"})
    assert sorted(info.value.problems) == [
        "`batch_size` must be an integer, got 'eight'",
        "`learning_rate` must be a number, got 'fast'",
        "`trust_remote_code` must be a boolean (true/false), got 'sure'",
    ]


def test_parse_settings_reports_lora_train_and_unknown_problems_together():
    with pytest.raises(ConfigError) as info:
        parse_settings({"r": 0, "batch_size": 0, "learning_rat": 0.1, "overflow": "x", "lora_dropout": 1})
    text = "\n".join(info.value.problems)
    assert len(info.value.problems) == 5
    for fragment in ("`r`", "`batch_size`", "Did you mean `learning_rate`?", "`overflow`", "`lora_dropout`"):
        assert fragment in text


# ---------------------------------------------------------------------------------------------
# Property: every bad field of a random invalid config is named in the one error

BAD_VALUES = {
    "r": st.sampled_from([0, -1, "x", 1.5, True]),
    "lora_alpha": st.sampled_from([0, -3.0, "nan", "alpha"]),
    "lora_dropout": st.sampled_from([1, 1.5, -0.2, "p"]),
    "target_modules": st.sampled_from([[], ",", [1], ["q_proj", ""]]),
    "bias": st.sampled_from(["some", "NONE", 3.5]),
    "task_type": st.sampled_from(["CAUSAL", "lm"]),
    "inference_mode": st.sampled_from(["perhaps", 5]),
    "use_rslora": st.sampled_from(["nah", 2]),
    "use_dora": st.sampled_from(["dora", -1]),
    "modules_to_save": st.sampled_from([4, ["lm_head", None]]),
}


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad=st.dictionaries(st.sampled_from(sorted(BAD_VALUES)), st.none(), min_size=1).flatmap(
    lambda keys: st.fixed_dictionaries({k: BAD_VALUES[k] for k in keys})))
def test_property_every_bad_field_is_named(bad):
    with pytest.raises(ConfigError) as info:
        lora_settings(bad)
    problems = info.value.problems
    assert len(problems) == len(bad)
    for name in bad:
        assert sum(f"`{name}`" in p for p in problems) == 1, (name, problems)
