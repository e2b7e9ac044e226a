"""Helpers shared by the benchmarks: machine description and JSON output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["machine_info", "emit", "run_and_emit", "exit_on_sigterm"]


def machine_info() -> dict[str, Any]:
    """A short description of the machine a result was measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


def emit(result: dict[str, Any], as_json: bool) -> None:
    """Print ``result``: one JSON object on stdout with ``--json``, else aligned lines."""
    if as_json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
        sys.stdout.flush()
        return
    width = max((len(k) for k in result), default=0)
    for key, value in result.items():
        if isinstance(value, float):
            value = f"{value:,.4g}"
        print(f"{key:<{width}}  {value}")


def exit_on_sigterm() -> None:
    """A SIGTERM ends the benchmark like Ctrl-C does: as an exception in the main thread,
    so the processes it started (SMPs, a broker, servers) are stopped and their shared
    memory removed by the ``finally`` blocks that own them (the default action killed the
    benchmark alone and left them running)."""

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


def run_and_emit(run: Callable[[argparse.Namespace], dict[str, Any]]
                 ) -> Callable[[argparse.Namespace], int]:
    """The command handler of a benchmark whose ``run(args)`` returns its result dict:
    runs it and prints the result (one JSON object with ``--json``)."""

    def handler(args: argparse.Namespace) -> int:
        exit_on_sigterm()
        emit(run(args), bool(getattr(args, "json", False)))
        return 0

    return handler
