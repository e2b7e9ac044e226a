"""``monolith bench <name>``: dispatches to the ``monolith.benchmarks`` entry points."""

from __future__ import annotations

from typing import Any

from monolith_py.cli import add_plugin_subcommands


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("bench", help="run a benchmark (prints JSON with --json)")
    sub = p.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    add_plugin_subcommands(sub, "monolith.benchmarks", prog="monolith bench")
