"""The ``monolith`` command.

Subcommands are discovered through the ``monolith.commands`` entry-point group (see
``pyproject.toml``); each entry point names a ``register(subparsers)`` function that adds
one sub-parser and sets ``func`` (called with the parsed namespace, returns an exit code).
This keeps the library out of the deployables' import graph: ``monolith_py`` never imports
``serving`` or ``streaming``; only this dispatcher loads them, by name, at run time.

Register functions must import nothing heavy at module level, so ``monolith --help``
stays fast; the command's handler does the heavy imports.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any

from monolith_py.errors import MonolithError

__all__ = ["main", "build_parser", "load_plugins"]

log = logging.getLogger("monolith")

_OUR_LOGGERS = ("monolith", "monolith_py", "streaming", "serving", "benchmarks")


def load_plugins(group: str) -> list[tuple[str, Callable[[Any], None] | BaseException]]:
    """Load every entry point of ``group``: ``(name, register_fn)`` or ``(name, error)``
    when the plugin fails to import (the command then reports that error when run)."""
    found: list[tuple[str, Callable[[Any], None] | BaseException]] = []
    for ep in sorted(entry_points(group=group), key=lambda e: e.name):
        try:
            found.append((ep.name, ep.load()))
        except Exception as exc:  # a broken plugin must not break the other commands
            found.append((ep.name, exc))
    return found


def _unavailable(name: str, exc: BaseException) -> Callable[[argparse.Namespace], int]:
    def run(_: argparse.Namespace) -> int:
        print(f"monolith {name}: unavailable ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2

    return run


def add_plugin_subcommands(
    subparsers: Any, group: str, *, prog: str = "monolith"
) -> None:
    """Add one sub-parser per entry point of ``group`` (used by ``monolith`` and
    ``monolith bench``)."""
    for name, plugin in load_plugins(group):
        if isinstance(plugin, BaseException):
            p = subparsers.add_parser(name, help=f"(unavailable: {plugin})")
            p.set_defaults(func=_unavailable(f"{prog} {name}".strip(), plugin))
        else:
            plugin(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="monolith",
        description="monolith-py: collisionless embeddings, online training, serving.",
    )
    parser.add_argument(
        "--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING, ERROR)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_plugin_subcommands(sub, "monolith.commands")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = getattr(logging, str(args.log_level).upper(), logging.INFO)
    # our loggers at the requested level; third-party ones (fbgemm logs every library it
    # loads at INFO on the root logger) only from WARNING, unless DEBUG is asked for
    logging.basicConfig(
        level=level if level <= logging.DEBUG else max(level, logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for name in _OUR_LOGGERS:
        logging.getLogger(name).setLevel(level)
    # torchrec's import trips a torch.fx deprecation notice at WARNING in every process
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except MonolithError as exc:
        print(f"monolith {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
