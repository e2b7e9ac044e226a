"""A stand-in role for supervisor tests: beats, serves /metrics, writes a ready file.

    python fakerole.py ROLE METRICS_PORT [--ready FILE] [--hang-once FLAG] [--exit-after S]
                       [--step-s S]

``--hang-once FLAG``: the first incarnation (FLAG absent) creates FLAG and stops beating
after a second while staying alive (metrics thread still answering); later ones run
normally. ``--exit-after S``: exit 0 after S seconds (a finite role). ``--step-s``: the
step time it reports (straggler tests).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from monolith_py.observe.heartbeat import Heartbeat
from monolith_py.observe.metrics import serve_metrics


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("role")
    p.add_argument("port", type=int)
    p.add_argument("--ready", default=None)
    p.add_argument("--hang-once", default=None)
    p.add_argument("--exit-after", type=float, default=None)
    p.add_argument("--step-s", type=float, default=0.01)
    a = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    serve_metrics(a.port)
    hang = False
    if a.hang_once and not os.path.exists(a.hang_once):
        open(a.hang_once, "w").close()
        hang = True
    if a.ready:
        with open(a.ready + ".tmp", "w") as f:
            f.write(f"127.0.0.1:{a.port}\n")
        os.replace(a.ready + ".tmp", a.ready)
    hb = Heartbeat(a.role)
    t0 = time.monotonic()
    while True:
        if a.exit_after is not None and time.monotonic() - t0 >= a.exit_after:
            return 0
        if hang and time.monotonic() - t0 > 1.0:
            time.sleep(3600)  # the main loop is stuck; the metrics thread lives on
        hb.step(a.step_s, examples=10)
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
