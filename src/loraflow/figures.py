"""The figures a run logs beside its metrics: the loss curve and the answers on the eval set."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping


def loss_curve(history: Mapping[str, list[tuple[int, float]]]):
    """Matplotlib figure of train loss (line) and eval loss (markers) against optimizer step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, style in (("train_loss", "-"), ("eval_loss", "o-")):
        points = history.get(key) or []
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, style, label=key.replace("_", " "))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("loraflow training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    plt.close(fig)
    return fig


def eval_quality(history: Mapping[str, list[tuple[int, float]]]):
    """Matplotlib figure of exact match and token F1 (left axis) and eval loss (right) against step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, style in (("eval_exact_match", "o-"), ("eval_token_f1", "s--")):
        if points := history.get(key):
            steps, values = zip(*points)
            ax.plot(steps, values, style, label=key.removeprefix("eval_").replace("_", " "))
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out answers (0-1)")
    loss_axis = ax.twinx()
    if points := history.get("eval_loss"):
        steps, values = zip(*points)
        loss_axis.plot(steps, values, "^:", color="grey", label="eval loss")
    loss_axis.set_ylabel("eval loss (nats/token)")
    lines = ax.get_legend_handles_labels()[0] + loss_axis.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], loc="center right")
    ax.set_title("loraflow: answers on the eval set")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    plt.close(fig)
    return fig


def _pyplot():
    """matplotlib's pyplot on the Agg backend (no display), imported without its font-cache notes."""
    with _quiet_font_cache_build():
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    return plt


# What matplotlib's font manager logs while it builds its cache (first use on a machine)
FONT_CACHE_MESSAGES = ("Matplotlib is building the font cache", "generated new fontManager")


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


@contextlib.contextmanager
def _quiet_font_cache_build() -> Iterator[None]:
    """Drop matplotlib's notes about building its font cache (its first use on a machine), and only them.

    Importing pyplot builds the cache when there is none: a timer logs "building the font cache"
    on `matplotlib.font_manager` if that takes over 5 s, then it logs "generated new fontManager"
    (INFO); nothing a user can act on in the middle of a run.
    """
    font_logger = logging.getLogger("matplotlib.font_manager")
    dropper = _DropMessages(FONT_CACHE_MESSAGES)
    font_logger.addFilter(dropper)
    try:
        yield
    finally:
        font_logger.removeFilter(dropper)
