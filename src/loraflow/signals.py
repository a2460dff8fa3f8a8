"""Stopping on a signal: Ctrl-C (SIGINT) and a scheduler's SIGTERM, caught one way, and the exit code
each one means for every command.

Imports nothing else of loraflow, so every layer (training, prediction, the CLI, sweeps) can use it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal's number, as a shell reports it


def exit_code(signal_name: str | None) -> int:
    """The exit code of a command stopped by `signal_name` (SIGINT's for anything else, such as a
    KeyboardInterrupt raised without a signal)."""
    return EXIT_CODES.get(signal_name or "SIGINT", EXIT_CODES["SIGINT"])


@contextlib.contextmanager
def stop_signals(*, interrupt: bool = False) -> Iterator[dict[str, str | None]]:
    """Catch SIGINT and SIGTERM while the block runs; the dict it yields names the last one in `signal`.

    Without `interrupt`, a signal only sets that flag, for a loop to check where it may stop (training,
    after an optimizer step). With it, a signal also raises KeyboardInterrupt where the block is (a
    batch job keeps its finished chunks). Handlers can only be installed from the main thread:
    elsewhere nothing is caught and the flag stays None.
    """
    caught: dict[str, str | None] = {"signal": None}

    def handler(signum: int, frame: Any) -> None:
        caught["signal"] = signal.Signals(signum).name
        if interrupt:
            raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield caught
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
