"""Tests for `loraflow validate`: settings checked against the model skeleton, errors as exit code 2."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from loraflow.cli import main


def invoke(*args: str):
    return CliRunner().invoke(main, ["validate", *args], catch_exceptions=False)


def report_value(output: str, key: str) -> int:
    match = re.search(rf"^\s*{key}\s+([\d,]+)\s*$", output, re.MULTILINE)
    assert match, f"{key} not in output:\n{output}"
    return int(match.group(1).replace(",", ""))


def test_validate_defaults_prints_settings_and_report():
    result = invoke()
    assert result.exit_code == 0, result.output
    out = result.output
    assert "LoRA settings:" in out
    assert re.search(r"^\s*r\s+16$", out, re.MULTILINE)
    assert re.search(r"^\s*target_modules\s+\['q_proj', 'k_proj', 'v_proj', 'o_proj'\]$", out, re.MULTILINE)
    assert "Base model: builtin:tiny" in out
    assert "Parameter report:" in out
    # default: r=16 on q,k,v,o of 2 layers: 16*((128+128) + (128+64) + (128+64) + (128+128)) * 2
    assert report_value(out, "lora_params") == report_value(out, "trainable_params") == 28672
    assert report_value(out, "other_trainable_params") == 0
    assert report_value(out, "total_params") == report_value(out, "trainable_params") + report_value(out, "frozen_params")


def test_validate_reports_all_problems_with_exit_code_2():
    result = CliRunner().invoke(main, ["validate", "--r", "0", "--lora-dropout", "2", "--target-modules", "q_prj"])
    assert result.exit_code == 2, result.output
    out = result.output
    assert "3 problems" in out
    assert "`r` (--r) must be a positive integer, got 0" in out
    assert "`lora_dropout` (--lora-dropout) must be >= 0 and < 1, got 2.0" in out
    assert "'q_prj' matches no module" in out and "Did you mean q_proj" in out
    assert "Traceback" not in out
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_validate_reads_a_yaml_config(tmp_path):
    path = tmp_path / "lora.yaml"
    path.write_text("r: 4\nlora_alpha: 8\ntarget_modules: [q_proj, v_proj]\nmodules_to_save: lm_head\n")
    result = invoke("--config", str(path))
    assert result.exit_code == 0, result.output
    assert re.search(r"^\s*r\s+4$", result.output, re.MULTILINE)
    assert re.search(r"^\s*modules_to_save\s+\['lm_head'\]$", result.output, re.MULTILINE)
    # 2 layers x r=4 x (q: 128+128, v: 128+64)
    assert report_value(result.output, "lora_params") == 2 * 4 * (256 + 192)
    assert report_value(result.output, "projector_params") == 1024 * 128  # builtin:tiny: vocab 1024, hidden 128 (tied lm_head)


def test_options_override_the_yaml_config(tmp_path):
    path = tmp_path / "lora.yaml"
    path.write_text("r: 4\ntarget_modules: q_proj\n")
    result = invoke("--config", str(path), "--r", "2", "--target-modules", "all-linear")
    assert result.exit_code == 0, result.output
    assert re.search(r"^\s*r\s+2$", result.output, re.MULTILINE)
    assert re.search(r"^\s*target_modules\s+all-linear$", result.output, re.MULTILINE)
    # all-linear, r=2: per layer 2 * (q 256 + k 192 + v 192 + o 256 + gate 384 + up 384 + down 384)
    assert report_value(result.output, "lora_params") == 2 * 2 * (256 + 192 + 192 + 256 + 384 * 3)


def test_unknown_yaml_key_gets_did_you_mean(tmp_path):
    path = tmp_path / "lora.yaml"
    path.write_text("r: 8\nlora_alpah: 16\n")
    result = invoke("--config", str(path))
    assert result.exit_code == 2
    assert "unknown setting `lora_alpah`. Did you mean `lora_alpha` (--lora-alpha)?" in result.output
    assert "Traceback" not in result.output


def test_bad_yaml_and_bad_values_are_usage_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- not\n- a mapping\n")
    result = invoke("--config", str(path))
    assert result.exit_code == 2 and "must hold a mapping of settings" in result.output
    result = invoke("--use-dora", "perhaps", "--bias", "al")
    assert result.exit_code == 2
    assert "`use_dora` (--use-dora) must be a boolean (true/false), got 'perhaps'" in result.output
    assert "Did you mean 'all'?" in result.output


def test_missing_config_file_is_rejected_by_click(tmp_path):
    result = invoke("--config", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2 and "does not exist" in result.output


def test_help_text_comes_from_the_field_docs():
    result = CliRunner().invoke(main, ["validate", "--help"])
    assert result.exit_code == 0
    assert "--target-modules" in result.output and "all-linear" in result.output
    assert "--lora-dropout" in result.output and "0 <= p < 1" in result.output


def test_validate_report_matches_the_real_model(tiny_model):
    from loraflow.lora import apply_lora, parameter_report

    real = parameter_report(apply_lora(tiny_model, {}))
    result = invoke()
    assert result.exit_code == 0
    assert report_value(result.output, "total_params") == real["total_params"]
