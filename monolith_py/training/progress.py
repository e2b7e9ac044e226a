"""Progress reporting for :meth:`OnlineTrainer.fit` (a ``tqdm`` bar or log lines)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["TqdmProgress", "format_progress"]


def format_progress(m: dict[str, Any]) -> str:
    """One line: examples, window/cumulative AUC, log loss, calibration, speed, rows.

    Example::

        >>> format_progress({"examples": 1000, "auc": 0.75, "window_auc": 0.77,
        ...                  "log_loss": 0.6, "calibration": 1.02, "examples_per_s": 5e4})
        'examples=1000 auc=0.7500 window_auc=0.7700 log_loss=0.6000 calib=1.020 ex/s=50000'
    """

    def f(v: Any, spec: str) -> str:
        return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    parts = [
        f"examples={m.get('examples', 0)}",
        f"auc={f(m.get('auc'), '.4f')}",
        f"window_auc={f(m.get('window_auc'), '.4f')}",
        f"log_loss={f(m.get('log_loss'), '.4f')}",
        f"calib={f(m.get('calibration'), '.3f')}",
        f"ex/s={f(m.get('examples_per_s'), '.0f')}",
    ]
    if "rows" in m:
        parts.append(f"rows={m['rows']}")
    if m.get("bad_batches"):
        parts.append(f"bad={m['bad_batches']}")
    return " ".join(parts)


class TqdmProgress:
    """A ``progress`` callback for :meth:`OnlineTrainer.fit` that drives a tqdm bar
    counting examples (``total`` examples when known) with the metrics as its postfix.

    Use as a context manager so the bar is closed::

        with TqdmProgress(total=len(replay)) as bar:
            trainer.fit(replay.batches(512), progress=bar)
    """

    def __init__(self, total: int | None = None, desc: str = "train", **tqdm_kwargs: Any) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=desc, unit="ex", **tqdm_kwargs)
        self._seen = 0

    def __call__(self, m: dict[str, Any]) -> None:
        done = int(m.get("examples", 0)) + 0
        self._bar.update(max(0, done - self._seen))
        self._seen = max(self._seen, done)
        self._bar.set_postfix_str(format_progress(m), refresh=False)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> TqdmProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
