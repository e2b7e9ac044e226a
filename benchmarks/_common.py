"""Helpers shared by the benchmarks: machine description and JSON output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["machine_info", "emit", "run_and_emit"]


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


def run_and_emit(run: Callable[[argparse.Namespace], dict[str, Any]]
                 ) -> Callable[[argparse.Namespace], int]:
    """The command handler of a benchmark whose ``run(args)`` returns its result dict:
    runs it and prints the result (one JSON object with ``--json``)."""

    def handler(args: argparse.Namespace) -> int:
        emit(run(args), bool(getattr(args, "json", False)))
        return 0

    return handler
