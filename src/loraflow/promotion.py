"""The promotion rules, pure: what a version must beat, how aliases are named, and the decision records.

Nothing here talks to the registry (`loraflow.registry` does), so each rule is tested on its own.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any

from loraflow.errors import ConfigError

CHAMPION = "champion"
PREVIOUS = "previous"
MODES = ("min", "max")
_ALIAS = re.compile(r"^[\w\-]+$")  # MLflow's rule for alias names
_RESERVED_ALIAS = re.compile(r"^([vV]\d+|latest)$", re.IGNORECASE)


@dataclass(frozen=True)
class Decision:
    """The outcome of one `promote_if_better` call."""

    promoted: bool
    """True if `version` now holds `alias`."""
    model_name: str
    """The registered model."""
    version: str
    """The candidate version."""
    alias: str
    """The alias the candidate competed for (default `champion`)."""
    metric: str
    """The metric compared, read from each version's source run."""
    candidate_value: float
    """The candidate's value of `metric`."""
    champion_version: str | None
    """The version that held `alias` before the decision; None if none did."""
    champion_value: float | None
    """Its value of `metric`; None if there was no champion."""
    reason: str
    """Why, in words (also recorded in the `promotion.reason` tag)."""

    @property
    def already_champion(self) -> bool:
        """The candidate held the alias already: nothing was decided or changed."""
        return self.champion_version == self.version

    def summary(self) -> str:
        """One readable line, e.g. `promoted: demo version 3 is now @champion: eval_loss 1.2 < ...`."""
        if self.promoted:
            head = f"promoted: {self.model_name} version {self.version} is now @{self.alias}"
        elif self.already_champion:
            head = f"unchanged: {self.model_name} version {self.version} already is @{self.alias}"
        else:
            head = f"rejected: {self.model_name} version {self.version} was not promoted to @{self.alias}"
        return f"{head}: {self.reason}"


@dataclass(frozen=True)
class Rollback:
    """The outcome of `rollback`: which version holds the alias now, and which one it replaced."""

    model_name: str
    """The registered model."""
    alias: str
    """The alias rolled back (default `champion`)."""
    version: str
    """The version that holds `alias` now (it held `previous_alias(alias)` before)."""
    replaced_version: str | None
    """The version that held `alias` before; it now holds `previous_alias(alias)`. None if none did."""

    def summary(self) -> str:
        """One readable line."""
        previous = previous_alias(self.alias)
        if self.replaced_version is None:
            return f"rolled back: {self.model_name} version {self.version} is now @{self.alias} (no @{self.alias} before)"
        return (f"rolled back: {self.model_name} version {self.version} is now @{self.alias}; "
                f"version {self.replaced_version} is now @{previous}")


# ---------------------------------------------------------------------------------------------
# Pure rules: argument checks and the metric comparison.


def previous_alias(alias: str) -> str:
    """Where the replaced holder of `alias` goes: `previous` for `champion`, else `<alias>-previous`.

    A separate slot per alias keeps independent alias tracks (e.g. `champion` and `canary`) from
    overwriting each other's rollback target.
    """
    return PREVIOUS if alias == CHAMPION else f"{alias}-previous"


def alias_problem(alias: Any) -> str | None:
    """What is wrong with `alias` as a promotion alias, or None if it can be used."""
    if not isinstance(alias, str) or not _ALIAS.match(alias):
        return (f"`alias` must be letters, digits, `_` or `-` (e.g. champion), got {alias!r}")
    if _RESERVED_ALIAS.match(alias):
        return f"`alias` {alias!r} is reserved by MLflow (`latest` and `v<number>` name versions); use e.g. champion"
    if alias == PREVIOUS or alias.endswith("-previous"):
        return f"`alias` {alias!r} is where promotion keeps the replaced version; promote to e.g. champion"
    return None


def version_problem(version: Any) -> str | None:
    """What is wrong with `version` as a model version number, or None (None itself means newest)."""
    if version is None or (isinstance(version, int) and not isinstance(version, bool) and version > 0):
        return None
    if isinstance(version, str) and re.fullmatch(r"[0-9]+", version.strip()) and int(version) > 0:
        return None
    return f"`version` must be a positive integer version number (e.g. 3), or empty for the newest; got {version!r}"


def check_arguments(version: Any, metric: Any, mode: Any, min_delta: Any, alias: Any) -> None:
    """Raise one `ConfigError` listing every bad argument of `promote_if_better`."""
    problems = [p for p in (version_problem(version), alias_problem(alias)) if p]
    if not isinstance(metric, str) or not metric.strip():
        problems.append(f"`metric` must name a metric of the training runs (e.g. eval_loss), got {metric!r}")
    if mode not in MODES:
        close = difflib.get_close_matches(str(mode).lower(), MODES, n=1, cutoff=0.3)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        problems.append(f"`mode` must be min (lower is better) or max (higher is better), got {mode!r}.{hint}")
    if (not isinstance(min_delta, (int, float)) or isinstance(min_delta, bool) or not math.isfinite(min_delta)
            or min_delta < 0):
        problems.append(f"`min_delta` must be a finite number >= 0 (the smallest improvement that counts), got {min_delta!r}")
    if problems:
        raise ConfigError(problems)


def improvement(candidate: float, champion: float, mode: str) -> float:
    """How much better the candidate is than the champion (negative: worse)."""
    return champion - candidate if mode == "min" else candidate - champion


def is_better(candidate: float, champion: float, mode: str = "min", min_delta: float = 0.0) -> bool:
    """True if `candidate` beats `champion` by at least `min_delta` (and by more than nothing).

    A NaN candidate is never better; any other candidate beats a NaN champion. An improvement that
    equals `min_delta` up to float rounding counts (1.0 - 0.9 vs 0.1).
    """
    if math.isnan(candidate):
        return False
    if math.isnan(champion):
        return True
    gain = improvement(candidate, champion, mode)
    if gain <= 0:
        return False
    return gain >= min_delta or math.isclose(gain, min_delta, rel_tol=1e-9, abs_tol=1e-12)


def metric_reason(metric: str, mode: str, min_delta: float, candidate: float, champion: float,
                   champion_version: str, better: bool) -> str:
    sign = ("<" if mode == "min" else ">") if better else ("is not below" if mode == "min" else "is not above")
    required = f" by at least {min_delta:g}" if min_delta else ""
    if better:
        return (f"{metric} {candidate:.6g} {sign} {champion:.6g} of version {champion_version}"
                f"{required} (mode {mode}), and it passed the health check")
    gain = improvement(candidate, champion, mode)
    shortfall = f" (improvement {gain:.3g} < min_delta {min_delta:g})" if min_delta and gain > 0 else ""
    return (f"{metric} {candidate:.6g} {sign} {champion:.6g} of champion version {champion_version}"
            f"{required} (mode {mode}){shortfall}; the champion is unchanged")
