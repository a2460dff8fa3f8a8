"""`--config` files that are not what they should be: one short message each, exit code 2 (issue 12)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from loraflow.cli import main
from loraflow.settings_file import load_yaml
from loraflow.errors import ConfigError
from loraflow.flavor.layout import MAX_ECHO

BILLION_LAUGHS = "\n".join(
    ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)]
    + ["r: *i"]
)


def validate(path) -> str:
    result = CliRunner().invoke(main, ["validate", "--config", str(path)])
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert "Traceback" not in result.output
    return result.output


@pytest.mark.parametrize("content, expected", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary file"),
    ("r: 8\nlora_alpha: caf\u00e9\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9"),
    (b"1: 2\n", "every key must be a setting name"),
    (b"null: 3\n", "every key must be a setting name"),
    (b"r: 8\nr: 16\n", "duplicate key 'r' (first on line 1)"),
    (b"- r\n- 8\n", "must hold a mapping of settings, got list"),
    (b"r: [8\n", "is not valid YAML"),
])
def test_a_bad_config_file_is_one_clear_usage_error(tmp_path, content, expected):
    path = tmp_path / "settings.yaml"
    path.write_bytes(content)
    assert expected in validate(path)


def test_nested_yaml_aliases_give_a_short_message_not_a_huge_one(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(BILLION_LAUGHS)
    assert len(path.read_bytes()) < 700
    output = validate(path)
    assert "anchors and aliases" in output and len(output) < 2000


def test_every_echoed_value_is_capped(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text("r: 8\n" + "x" * 5000 + ": [\n")
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    assert len(str(info.value)) < 3 * MAX_ECHO


def test_a_good_config_file_still_loads(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("r: 8\ntarget_modules: [q_proj, v_proj]\nlearning_rate: 0.001\n")
    assert load_yaml(path) == {"r": 8, "target_modules": ["q_proj", "v_proj"], "learning_rate": 0.001}
