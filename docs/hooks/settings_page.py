"""MkDocs hook: generate `reference/settings.md` from the settings' field docs on every build.

Each setting is a field of a frozen dataclass in `loraflow.config`, and its `help` metadata is the
one place it is documented (the CLI help is generated from it too). This hook renders those fields
as tables, so the page cannot drift from the code. Nothing is written into `docs/`: the page exists
only in the build (`File.generated`, MkDocs 1.6).
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from pathlib import Path

import yaml
from mkdocs.structure.files import File

PAGE = "reference/settings.md"
ROOT = Path(__file__).resolve().parents[2]


def _import_config():
    src = str(ROOT / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    from loraflow import config

    return config


def _settings_classes(config) -> list[type]:
    """The dataclasses of `loraflow.config` with documented fields, in the order they are defined."""
    classes = [
        cls for _, cls in inspect.getmembers(config, inspect.isclass)
        if cls.__module__ == config.__name__ and dataclasses.is_dataclass(cls)
        and any("help" in f.metadata for f in dataclasses.fields(cls))
    ]
    return sorted(classes, key=lambda cls: inspect.getsourcelines(cls)[1])


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "(required)"
    if value is None or value == ():
        return "(unset)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (tuple, list)):
        return "`" + ",".join(map(str, value)) + "`"
    return f"`{value}`"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _mlproject_params() -> set[str]:
    entry_points = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    return set(entry_points.get("main", {}).get("parameters", {}))


def render() -> str:
    """The settings reference page, as Markdown."""
    config = _import_config()
    params = _mlproject_params()
    lines = [
        "# Settings reference",
        "",
        "Generated from the field docs of `loraflow.config` each time the site is built.",
        "Every setting is a `loraflow train` option, a key of a YAML file passed with `--config`, and,",
        "where the last column says so, a parameter of the MLproject's `main` entry point",
        "(`mlflow run . -P name=value`). Strings are accepted everywhere (`\"16\"`, `\"true\"`,",
        "`\"q_proj,v_proj\"`); an empty string means unset. `loraflow train --help` prints the same text.",
        "In Python, the training settings come in groups, one table each below: `TrainSettings.model`",
        "(`ModelSettings`), `.data`, `.optim`, `.eval` and `.tracking`; `TrainSettings.from_flat(max_steps=2)`",
        "builds them from flat names, and `config.to_dict` gives the flat names back.",
        "",
    ]
    for cls in _settings_classes(config):
        doc = inspect.getdoc(cls) or ""
        lines += [f"## `{cls.__name__}`", "", doc.splitlines()[0] if doc else "", ""]
        lines += ["| setting | option | default | `-P` | what it does |", "|---|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            if "help" not in f.metadata:
                continue
            option = "--" + f.name.replace("_", "-")
            mlproject = "yes" if f.name in params else ""
            lines.append(f"| `{f.name}` | `{option}` | {_cell(_default(f))} | {mlproject} | {_cell(f.metadata['help'])} |")
        lines.append("")
    return "\n".join(lines)


def on_files(files, config):
    """Add the generated settings page to the build."""
    files.append(File.generated(config, PAGE, content=render()))
    return files
