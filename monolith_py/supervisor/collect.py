"""Scraping roles and turning their samples into the series the status page draws.

:func:`derive` is pure: from a role's kind, its current scrape and the previous one, the
values of that role's series at this instant, named ``<series>:<role>`` (e.g.
``auc:trainer/0``, ``rows:ps/1``, ``step_s:trainer/0``). :data:`SERIES` documents every
series name. :class:`Scraper` fetches ``/metrics`` of many roles in parallel with a short
timeout (a hung role must not stall the supervisor).

Example::

    >>> from monolith_py.observe.timeseries import parse_metrics
    >>> prev = parse_metrics('monolith_steps_total{role="trainer/0"} 10\\n'
    ...                      'monolith_step_seconds_total{role="trainer/0"} 1.0\\n')
    >>> cur = parse_metrics('monolith_steps_total{role="trainer/0"} 20\\n'
    ...                     'monolith_step_seconds_total{role="trainer/0"} 3.0\\n'
    ...                     'monolith_train_auc{role="trainer/0"} 0.7\\n')
    >>> out = derive("trainer", "trainer/0", cur, (0.0, prev), now=1.0)
    >>> out["step_s:trainer/0"], out["auc:trainer/0"]
    (0.2, 0.7)
"""

from __future__ import annotations

import concurrent.futures
import urllib.error
import urllib.request
from collections.abc import Mapping

from monolith_py.errors import DecodeError
from monolith_py.observe.heartbeat import BEATS, STEP_SECONDS, STEPS
from monolith_py.observe.timeseries import Samples, parse_metrics, select

__all__ = ["derive", "beats", "Scraper", "SERIES", "fetch_metrics"]

SERIES = {
    "step_s": "mean seconds per step in the last interval (heartbeat roles)",
    "ex_rate": "examples per second in the last interval (trainers)",
    "auc": "progressive AUC (trainers)",
    "window_auc": "AUC over the recent window (trainers)",
    "log_loss": "progressive log loss (trainers)",
    "trained": "examples trained (trainers; restored with the snapshot)",
    "lag": "messages behind the end of the examples topic (trainers)",
    "rows": "embedding rows held (PS shards)",
    "admitted": "ids admitted into the tables (PS shards)",
    "filtered": "gradient rows dropped by the frequency filter (PS shards)",
    "expired": "rows expired (PS shards)",
    "rpc_ms": "mean PS RPC service time in the last interval, ms (PS shards)",
    "stall_ms": "mean snapshot stall in the last interval, ms (PS shards, trainers)",
    "freshness_s": "seconds since the stalest shard last synced (serving)",
    "serve_rows": "rows held by the serving replica (serving)",
    "emitted": "examples written by the joiner",
    "pending": "impressions waiting for their window (joiner)",
    "smp_bytes": "bytes stored by the SMP",
}
"""Series name -> meaning (each stored per role as ``<name>:<role>``)."""


def _delta_mean(cur: Samples, prev: Samples | None, sum_name: str, count_name: str,
                **labels: str) -> float | None:
    if prev is None:
        return None
    s1, c1 = select(cur, sum_name, **labels), select(cur, count_name, **labels)
    s0, c0 = select(prev, sum_name, **labels), select(prev, count_name, **labels)
    if None in (s1, c1, s0, c0):
        return None
    assert s1 is not None and c1 is not None and s0 is not None and c0 is not None
    dc, ds = c1 - c0, s1 - s0
    if dc <= 0 or ds < 0:  # nothing new, or the process restarted (counters reset)
        return None
    return ds / dc


def derive(kind: str, role: str, cur: Samples, prev: tuple[float, Samples] | None,
           now: float) -> dict[str, float]:
    """The role's series values at ``now`` (see :data:`SERIES`)."""
    out: dict[str, float] = {}
    p_t, p_s = prev if prev is not None else (None, None)

    def put(name: str, v: float | None, scale: float = 1.0) -> None:
        if v is not None:
            out[f"{name}:{role}"] = v * scale

    put("step_s", _delta_mean(cur, p_s, STEP_SECONDS, STEPS, role=role))
    if kind == "trainer":
        ex1 = select(cur, "monolith_step_examples_total", role=role)
        ex0 = select(p_s, "monolith_step_examples_total", role=role) if p_s else None
        if ex1 is not None and ex0 is not None and p_t is not None and now > p_t:
            put("ex_rate", (ex1 - ex0 if ex1 >= ex0 else ex1) / (now - p_t))
        for name in ("auc", "window_auc", "log_loss"):
            put(name, select(cur, f"monolith_train_{name}", role=role))
        put("trained", select(cur, "monolith_train_trained_examples", role=role))
        put("lag", select(cur, "monolith_stream_lag_messages"))
        put("stall_ms", _delta_mean(cur, p_s, "monolith_snapshot_stall_seconds_sum",
                                    "monolith_snapshot_stall_seconds_count"), 1000.0)
    elif kind == "ps":
        put("rows", select(cur, "monolith_table_rows"))
        put("admitted", select(cur, "monolith_table_admitted"))
        put("filtered", select(cur, "monolith_table_filtered"))
        put("expired", select(cur, "monolith_table_expired"))
        put("rpc_ms", _delta_mean(cur, p_s, "monolith_ps_server_rpc_seconds_sum",
                                  "monolith_ps_server_rpc_seconds_count"), 1000.0)
        put("stall_ms", _delta_mean(cur, p_s, "monolith_snapshot_stall_seconds_sum",
                                    "monolith_snapshot_stall_seconds_count"), 1000.0)
    elif kind == "serve":
        synced = [v for _, v in cur.get("monolith_serving_last_sync_timestamp_seconds", ())]
        if synced:
            put("freshness_s", max(0.0, now - min(synced)))
        put("serve_rows", select(cur, "monolith_serving_table_rows"))
    elif kind == "joiner":
        put("emitted", select(cur, "monolith_joiner_emitted", role=role))
        put("pending", select(cur, "monolith_joiner_pending_impressions", role=role))
    elif kind == "smp":
        put("smp_bytes", select(cur, "monolith_smp_stored_bytes"))
    return out


def beats(samples: Samples, role: str) -> float | None:
    """The role's heartbeat counter in a scrape."""
    return select(samples, BEATS, role=role)


def fetch_metrics(url: str, timeout_s: float) -> Samples:
    """GET and parse one ``/metrics``; raises ``OSError``/``DecodeError``."""
    with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 (loopback URLs)
        return parse_metrics(r.read().decode("utf-8", "replace"))


class Scraper:
    """Fetch many ``/metrics`` URLs in parallel; failures map to ``None``."""

    def __init__(self, threads: int = 4, timeout_s: float = 2.0) -> None:
        self.timeout_s = timeout_s
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, "scrape")

    def scrape(self, urls: Mapping[str, str]) -> dict[str, Samples | None]:
        futs = {name: self._pool.submit(fetch_metrics, url, self.timeout_s)
                for name, url in urls.items()}
        out: dict[str, Samples | None] = {}
        for name, fut in futs.items():
            try:
                out[name] = fut.result(timeout=self.timeout_s + 1.0)
            except (OSError, DecodeError, urllib.error.URLError, ValueError,
                    concurrent.futures.TimeoutError):
                out[name] = None
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
