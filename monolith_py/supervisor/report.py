"""Exactly-once accounting, the live progress display and the final summary of a run.

:func:`account` compares what was *produced* (impression ids), what the joiner *wrote*
(example ids in the examples topic, with multiplicity) and what the trainers *trained*
(their exactly-once ledgers: count, sum and xor of trained ids, kept in the snapshots
next to the Kafka offsets). Nothing lost and nothing duplicated means: every impression
became exactly one example, and the trainers' combined ledger equals the ledger of the
examples topic.

Example::

    >>> import numpy as np
    >>> from monolith_py.snapshot.ledger import ExactlyOnceLedger
    >>> ex = np.arange(10)
    >>> acc = account(np.arange(10), ex, [ExactlyOnceLedger.of(ex[:6]).state_dict(),
    ...                                   ExactlyOnceLedger.of(ex[6:]).state_dict()])
    >>> acc["lost"], acc["duplicated"], acc["ledger_match"]
    (0, 0, True)
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import numpy as np

from monolith_py.snapshot.ledger import ExactlyOnceLedger

__all__ = ["account", "combine_ledgers", "ProgressDisplay", "format_summary"]

_MASK = (1 << 64) - 1


def combine_ledgers(ledgers: Sequence[Mapping[str, Any]]) -> ExactlyOnceLedger:
    """The ledger of the union of disjoint trainers' examples (count and sum add, xor
    xors)."""
    out = ExactlyOnceLedger()
    for led in ledgers:
        one = ExactlyOnceLedger()
        one.load_state_dict(led)
        out.count += one.count
        out.sum = (out.sum + one.sum) & _MASK
        out.xor ^= one.xor
    return out


def account(impressions: np.ndarray, examples: np.ndarray,
            ledgers: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Lost / duplicated examples from the ids produced (``impressions``), written to the
    examples topic (``examples``, with repeats) and the trainers' ``ledgers``.

    ``lost`` counts impressions that never became an example plus examples never trained;
    ``duplicated`` counts examples written twice plus examples trained twice. When the
    ledgers disagree but the counts are equal (one lost and one doubled), both are at
    least 1."""
    imp = np.unique(np.asarray(impressions, dtype=np.int64))
    ex = np.asarray(examples, dtype=np.int64)
    uniq = np.unique(ex)
    join_lost = int(np.setdiff1d(imp, uniq, assume_unique=True).shape[0])
    topic_dups = int(ex.shape[0] - uniq.shape[0])
    want = ExactlyOnceLedger.of(uniq)
    got = combine_ledgers(ledgers)
    match = got == want
    if match:
        train_lost = train_dup = 0
    else:
        train_lost = max(0, want.count - got.count)
        train_dup = max(0, got.count - want.count)
        if train_lost == train_dup == 0:
            train_lost = train_dup = 1
    return {"impressions": int(imp.shape[0]), "examples_written": int(ex.shape[0]),
            "unique_examples": int(uniq.shape[0]), "examples_trained": got.count,
            "join_lost": join_lost, "topic_duplicates": topic_dups,
            "trained_lost": train_lost, "trained_duplicated": train_dup,
            "lost": join_lost + train_lost, "duplicated": topic_dups + train_dup,
            "ledger_match": bool(match), "ledger_trained": got.state_dict(),
            "ledger_expected": want.state_dict()}


def _f(v: Any, spec: str, none: str = "-") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    return format(v, spec)


class ProgressDisplay:
    """A live line: a tqdm bar on a terminal, plain lines every ``every_s`` otherwise."""

    def __init__(self, total: int | None, stream: TextIO | None = None, every_s: float = 10.0,
                 tty: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.every_s = every_s
        self._last = 0.0
        self._bar: Any = None
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="ex", desc="trained", file=self.stream,
                             dynamic_ncols=True, smoothing=0.1)

    def update(self, v: Mapping[str, Any]) -> None:
        """``v``: trained, auc, ex_per_s, lag, rows, snapshot, freshness_s, restarts,
        phase."""
        text = (f"auc={_f(v.get('auc'), '.4f')} ex/s={_f(v.get('ex_per_s'), '.0f')} "
                f"lag={_f(v.get('lag'), '.0f')} rows={_f(v.get('rows'), '.0f')} "
                f"snap={v.get('snapshot') if v.get('snapshot') is not None else '-'} "
                f"fresh={_f(v.get('freshness_s'), '.1f')}s restarts={v.get('restarts', 0)}")
        if self._bar is not None:
            n = int(v.get("trained") or 0)
            self._bar.n = n
            self._bar.set_postfix_str(f"{v.get('phase', '')} {text}", refresh=False)
            self._bar.refresh()
            return
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            print(f"[{v.get('elapsed', 0):6.0f}s] {v.get('phase', ''):9s} "
                  f"trained={v.get('trained') or 0} {text}", file=self.stream, flush=True)

    def write(self, line: str) -> None:
        """Print a line without breaking the bar."""
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def format_summary(s: Mapping[str, Any]) -> str:
    """The human-readable summary printed at the end of ``monolith up``."""
    ok = "OK" if s.get("ok") else "NOT OK"
    lines = [
        f"== monolith up: {ok}" + (f" ({s['reason']})" if s.get("reason") else ""),
        f"   source            {s.get('source')}  ({s.get('duration_s', 0):.0f} s)",
        f"   examples trained  {s.get('examples_trained')}  of {s.get('unique_examples')} "
        f"written by the joiner from {s.get('impressions')} impressions",
        f"   lost / duplicated {s.get('lost')} / {s.get('duplicated')}  (ledger match: "
        f"{s.get('ledger_match')})",
        f"   final AUC         {_f(s.get('final_auc'), '.4f')}  log loss "
        f"{_f(s.get('final_log_loss'), '.4f')}",
        f"   throughput        {_f(s.get('examples_per_s'), '.0f')} examples/s (trainers)",
        f"   snapshots         {s.get('snapshots_taken')} sealed, restarts {s.get('restarts')}, "
        f"chaos kills {s.get('chaos_kills', 0)}",
        f"   serving           {s.get('serving', {}).get('detail', '-')}",
        f"   run directory     {s.get('run_dir')}  (logs, events.jsonl, summary.json)",
    ]
    return "\n".join(lines)
