"""The documentation site builds without a warning, its Python compiles, and it reads as documentation.

`mkdocs build --strict` fails on a broken link, a missing page, a bad mkdocstrings reference or a
missing snippet; the settings page it generates must list every setting.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from loraflow import config

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("**/*.md"))
PYTHON_BLOCK = re.compile(r"^```(?:python|py)\n(.*?)^```", flags=re.S | re.M)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "WARNING" not in proc.stderr, proc.stderr[-4000:]
    return out


def test_the_site_builds_strictly_with_every_page(site):
    for page in DOCS:
        relative = page.relative_to(ROOT / "docs")
        if relative.parts[0] == "hooks":
            continue
        built = site / ("index.html" if relative.stem == "index" else f"{relative.with_suffix('')}/index.html")
        assert built.is_file(), f"{relative} was not built"


def test_the_settings_reference_lists_every_setting_with_its_help(site):
    html = (site / "reference" / "settings" / "index.html").read_text()
    for cls in (config.LoraSettings, config.TrainSettings):
        for name in config.field_names(cls):
            assert f"<code>{name}</code>" in html, f"settings page lacks {name}"
            assert f"<code>--{name.replace('_', '-')}</code>" in html


def test_the_benchmarks_page_includes_the_committed_results(site):
    html = (site / "benchmarks" / "index.html").read_text()
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    command = re.search(r"^Command: `([^`]+)`", results, flags=re.M)[1].strip()
    assert command in html
    for heading in re.findall(r"^## (.+)$", results, flags=re.M):
        assert heading.split("`")[0].strip() in html, f"RESULTS.md section {heading!r} missing from the page"


def python_blocks(path: Path) -> list[tuple[int, str]]:
    text = path.read_text()
    return [(text[: m.start()].count("\n") + 1, m[1]) for m in PYTHON_BLOCK.finditer(text)]


@pytest.mark.parametrize("path", [*DOCS, ROOT / "README.md"], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_block_compiles(path):
    for line, code in python_blocks(path):
        compile(code, f"{path.name}:{line}", "exec")


DIARY = re.compile(r"\bsession\b|this turn|the last turn|\bissue #?\d+", flags=re.I)
ALLOWED = re.compile(r"(spark|http|requests?)\W+session|session\W+(of\s+)?(spark|http)|active spark session|"
                     r"spark session", flags=re.I)


@pytest.mark.parametrize("path", [*DOCS, ROOT / "README.md"], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_diary_in_the_documentation(path):
    """Documentation states what is true with its date and conditions, not how the work went."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        for match in DIARY.finditer(line):
            window = line[max(0, match.start() - 30): match.end() + 30]
            assert ALLOWED.search(window), f"{path.name}:{number}: {line.strip()}"
