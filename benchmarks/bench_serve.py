"""``monolith bench serve``: train -> serve freshness and HTTP predict throughput/latency,
beside a bare FastAPI handler running the same model (the anchor), in the same run.

Setup: a PS shard in this process (tables pre-filled with ``--rows`` ids per feature, a
DLRM built from a :class:`~monolith_py.modules.spec.ModelSpec`), its sync service on
loopback gRPC, and a real ``monolith serve`` process following it (``--sync-interval``,
default 1 s). A trainer thread trains on random batches the whole time freshness is
measured and publishes the dense state every ``--dense-interval`` seconds.

* ``freshness_p50_s`` / ``freshness_p99_s``: a sparse update of a never-seen probe id on
  the PS (one optimizer step on its row) -> the first served answer that reflects it. The
  client asks for ``[probe, control]`` every 5 ms; before the update both read the default
  row and score the same, so the answer "changes" exactly when the delta was applied
  (dense updates move both scores alike).
* ``predict_p50_ms`` / ``predict_p99_ms`` / ``rps``: batch-1 requests, ``--concurrency``
  keep-alive connections (training stopped); medians of ``--rounds`` phases that
  alternate with the anchor's, so both see the same machine load.
* ``examples_per_s``: batch-256 requests at the same concurrency.
* ``bare_rps`` (+ ``bare_p50_ms``, ``bare_p99_ms``): a plain FastAPI app in its own
  uvicorn process, synchronous handler (FastAPI's thread pool), same request schema,
  same model and rows, no sync, no batching.

The load generator is one asyncio client with raw HTTP/1.1 keep-alive connections, the
same for both servers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

__all__ = ["register"]

FEATURES = ("user", "item", "category", "context")
NUM_DENSE = 13


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="train->serve freshness and HTTP predict "
                                            "throughput beside a bare FastAPI handler")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per load phase")
    p.add_argument("--rounds", type=int, default=3,
                   help="batch-1 phases per server, alternating ours/bare (medians)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--probes", type=int, default=40, help="freshness measurements")
    p.add_argument("--sync-interval", type=float, default=1.0)
    p.add_argument("--dense-interval", type=float, default=5.0)
    p.add_argument("--rows", type=int, default=50_000, help="ids per table before the run")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batching", choices=("thread", "inline"), default="thread",
                   help="our server's batching mode")
    p.set_defaults(func=_main)


# -- a tiny HTTP/1.1 keep-alive client (the same for both servers) -------------------------


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer

    @classmethod
    async def open(cls, port: int) -> _Conn:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        return cls(r, w)

    async def call(self, request: bytes) -> tuple[int, bytes]:
        self.w.write(request)
        head = await self.r.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = 0
        for line in lines[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self.r.readexactly(length)

    def close(self) -> None:
        self.w.close()


def _post(body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    return (b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))


def _bodies(n: int, batch: int, rows: int, seed: int) -> list[bytes]:
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        exs = [{"features": {f: [int(rng.integers(0, rows))] for f in FEATURES},
                "dense": [round(float(x), 4) for x in rng.standard_normal(NUM_DENSE)]}
               for _ in range(batch)]
        out.append(_post({"examples": exs}))
    return out


async def _load(port: int, bodies: list[bytes], concurrency: int, duration: float
                ) -> dict[str, float]:
    lat: list[float] = []
    errors = 0

    async def one(k: int, until: float, record: bool) -> None:
        nonlocal errors
        conn = await _Conn.open(port)
        i = k
        try:
            while time.perf_counter() < until:
                t0 = time.perf_counter()
                status, _ = await conn.call(bodies[i % len(bodies)])
                if record:
                    lat.append(time.perf_counter() - t0)
                    errors += status != 200
                i += concurrency
        finally:
            conn.close()

    warm = time.perf_counter() + 1.0
    await asyncio.gather(*(one(k, warm, False) for k in range(concurrency)))
    start = time.perf_counter()
    await asyncio.gather(*(one(k, start + duration, True) for k in range(concurrency)))
    elapsed = time.perf_counter() - start
    lat.sort()
    return {"rps": len(lat) / elapsed, "p50_ms": 1000 * lat[len(lat) // 2],
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
            "errors": float(errors), "requests": float(len(lat))}


# -- the training side ---------------------------------------------------------------------


class _Training:
    def __init__(self, args: argparse.Namespace) -> None:
        import numpy as np
        import torch

        from monolith_py.modules.spec import ModelSpec
        from monolith_py.sync import DenseBoard, LockedBackend, ShardPublisher
        from monolith_py.table import EmbeddingTable, OptimizerConfig, TableConfig
        from monolith_py.table.backend import LocalBackend

        torch.set_num_threads(1)
        self.args = args
        configs = [TableConfig(f, dim=args.dim, optimizer=OptimizerConfig("adagrad", lr=0.1),
                               initial_capacity=2 * args.rows) for f in FEATURES]
        self.spec = ModelSpec.dlrm(configs, num_dense=NUM_DENSE, bottom_mlp=(64, args.dim),
                                   top_mlp=(64, 32))
        self.tables = {c.name: EmbeddingTable(c) for c in configs}
        rng = np.random.default_rng(args.seed)
        for t in self.tables.values():
            keys = np.arange(args.rows, dtype=np.int64)
            t.load_rows(keys, (rng.standard_normal((args.rows, args.dim)) * 0.05)
                        .astype(np.float32))
        self.lock = threading.Lock()
        self.backend = LockedBackend(LocalBackend(self.tables), self.lock)
        self.model = self.spec.build(backend=self.backend, seed=args.seed)
        self.opt = torch.optim.Adagrad(self.model.parameters(), lr=0.01)
        self.publisher = ShardPublisher(0, self.tables, lock=self.lock)
        self.board = DenseBoard()
        self.rng = rng
        self.stop = threading.Event()
        self.steps = 0

    def publish_dense(self) -> tuple[int, int]:
        return self.board.put_state(self.spec.to_dict(), self.model.state_dict())

    def train(self) -> None:
        import torch
        import torch.nn.functional as F
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        b = 256
        last_dense = time.monotonic()
        while not self.stop.is_set():
            ids = torch.from_numpy(self.rng.integers(0, self.args.rows, len(FEATURES) * b))
            kjt = KeyedJaggedTensor.from_lengths_sync(
                keys=list(FEATURES), values=ids,
                lengths=torch.ones(len(FEATURES) * b, dtype=torch.int64))
            dense = torch.from_numpy(self.rng.standard_normal((b, NUM_DENSE))
                                     .astype("float32"))
            y = torch.from_numpy((self.rng.random(b) < 0.3).astype("float32"))
            loss = F.binary_cross_entropy_with_logits(self.model(dense, kjt), y)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            self.model.embedding.apply_sparse_gradients(1_700_000_000 + self.steps)
            self.steps += 1
            if time.monotonic() - last_dense >= self.args.dense_interval:
                self.publish_dense()
                last_dense = time.monotonic()
            time.sleep(0.005)  # leave the GIL to the sync service now and then

    def update_probe(self, key: int) -> None:
        """One sparse optimizer step on ``key`` in every table (admits it)."""
        import torch

        grads = {f: (torch.tensor([key]), torch.full((1, self.args.dim), 1.0))
                 for f in FEATURES}
        self.backend.apply_gradients(grads, now=1_700_000_000 + self.steps)

    def save_model(self, path: str) -> None:
        """Spec, dense tensors and every row, for the bare anchor."""
        from monolith_py.wire import encode_arrays

        arrays: dict[str, Any] = {f"dense/{k}": v for k, v in self.model.state_dict().items()}
        with self.lock:
            for name, t in self.tables.items():
                sd = t.state_dict()
                arrays[f"keys/{name}"] = sd["keys"]
                arrays[f"rows/{name}"] = sd["weights"]
        with open(path, "wb") as f:
            f.write(encode_arrays(arrays, meta={"spec": self.spec.to_dict()}))


# -- the bare anchor (runs as its own process) -----------------------------------------------


def _bare_main(model_path: str, port: int) -> None:
    import torch
    import uvicorn
    from fastapi import FastAPI
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from monolith_py.modules.spec import ModelSpec
    from monolith_py.table import EmbeddingTable
    from monolith_py.table.backend import LocalBackend
    from monolith_py.wire import decode_arrays
    from serving.schema import ApiLimits, make_schemas

    torch.set_num_threads(1)
    with open(model_path, "rb") as f:
        arrays, meta = decode_arrays(f.read(), copy=True)
    spec = ModelSpec.from_dict(meta["spec"])
    tables = {}
    for cfg in spec.tables:
        t = EmbeddingTable(cfg)
        t.load_rows(arrays[f"keys/{cfg.name}"], arrays[f"rows/{cfg.name}"])
        tables[cfg.name] = t
    model = spec.build(backend=LocalBackend(tables))
    model.load_state_dict({k[6:]: torch.from_numpy(v) for k, v in arrays.items()
                           if k.startswith("dense/")})
    model.eval()
    names = list(spec.feature_names)
    _, PredictRequest = make_schemas(ApiLimits())
    app = FastAPI()

    def predict(body: Any) -> dict[str, Any]:
        exs = body.examples  # type: ignore[attr-defined]
        lengths = [len(e.features.get(f, ())) for f in names for e in exs]
        values = [v for f in names for e in exs for v in e.features.get(f, ())]
        kjt = KeyedJaggedTensor(keys=names, values=torch.tensor(values, dtype=torch.int64),
                                lengths=torch.tensor(lengths, dtype=torch.int64))
        with torch.inference_mode():
            scores = torch.sigmoid(model(torch.tensor([e.dense for e in exs]), kjt))
        return {"scores": scores.tolist(), "model_version": "bare"}

    predict.__annotations__["body"] = PredictRequest  # a class made at run time
    app.post("/v1/predict")(predict)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# -- the run ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(port: int, path: str, proc: subprocess.Popen[bytes], timeout: float = 180
               ) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"port {port}{path} not ready within {timeout} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


async def _freshness(tr: _Training, port: int, probes: int, sync_interval: float
                     ) -> list[float]:
    import numpy as np

    conn = await _Conn.open(port)
    rng = np.random.default_rng(tr.args.seed + 1)
    out = []
    dense = [0.1] * NUM_DENSE
    try:
        for i in range(probes):
            probe, control = 10**12 + i, 2 * 10**12 + i
            req = _post({"examples": [
                {"features": {f: [probe] for f in FEATURES}, "dense": dense},
                {"features": {f: [control] for f in FEATURES}, "dense": dense}]})
            status, body = await conn.call(req)
            s = json.loads(body)["scores"]
            if status != 200 or abs(s[0] - s[1]) > 1e-6:
                raise RuntimeError(f"probe {probe} is not at the default before its update")
            await asyncio.sleep(float(rng.uniform(0, sync_interval)))  # random phase
            t0 = time.perf_counter()
            await asyncio.to_thread(tr.update_probe, probe)
            while True:
                status, body = await conn.call(req)
                s = json.loads(body)["scores"]
                if abs(s[0] - s[1]) > 1e-6:  # the update moves the score far more
                    out.append(time.perf_counter() - t0)
                    break
                if time.perf_counter() - t0 > 30:
                    raise RuntimeError("a PS update did not reach serving within 30 s")
                await asyncio.sleep(0.005)
    finally:
        conn.close()
    return out


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per-key median over load phases (errors summed)."""
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out["errors"] = sum(r["errors"] for r in runs)
    return out


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _main(args: argparse.Namespace) -> int:
    from benchmarks._common import emit, exit_on_sigterm, machine_info
    from monolith_py.sync import SyncService, serve_sync

    exit_on_sigterm()

    tr = _Training(args)
    tr.publish_dense()
    service = SyncService(tr.publisher, tr.board)
    server, sync_port = serve_sync(service)
    port = _free_port()
    # one OpenMP thread per thread for both servers: otherwise every thread that runs torch
    # ops (the bare app's thread pool) spins up an OpenMP team per small op
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    ours = subprocess.Popen(
        [sys.executable, "-m", "monolith_py.cli", "--log-level", "WARNING", "serve",
         "--ps", f"127.0.0.1:{sync_port}", "--port", str(port),
         "--sync-interval", str(args.sync_interval), "--batching", args.batching],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bare = None
    trainer = threading.Thread(target=tr.train, name="bench-trainer", daemon=True)
    try:
        _wait_http(port, "/readyz", ours)
        trainer.start()
        fresh = asyncio.run(_freshness(tr, port, args.probes, args.sync_interval))
        tr.stop.set()
        trainer.join(60)
        tr.publish_dense()
        one = _bodies(64, 1, args.rows, args.seed + 2)
        big = _bodies(8, 256, args.rows, args.seed + 3)
        time.sleep(2 * args.sync_interval + 0.5)  # the last delta and dense state arrive
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.mnf")
            tr.save_model(path)
            bare_port = _free_port()
            bare = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.bench_serve", "--bare", path,
                 str(bare_port)], env=env, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
            probe = _post({"examples": [{"features": {"user": [1]},
                                         "dense": [0.0] * NUM_DENSE}]})
            deadline = time.monotonic() + 180
            while True:  # no /readyz on the bare app: wait for a 200 from predict
                try:
                    async def ping() -> int:
                        c = await _Conn.open(bare_port)
                        try:
                            return (await c.call(probe))[0]
                        finally:
                            c.close()
                    if asyncio.run(ping()) == 200:
                        break
                except OSError:
                    pass
                if bare.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the bare anchor did not start")
                time.sleep(0.2)
            # alternate short phases so both servers see the same machine load
            rounds: dict[str, list[dict[str, float]]] = {"ours": [], "bare": []}
            for _ in range(args.rounds):
                rounds["ours"].append(asyncio.run(
                    _load(port, one, args.concurrency, args.duration)))
                rounds["bare"].append(asyncio.run(
                    _load(bare_port, one, args.concurrency, args.duration)))
            ours_256 = asyncio.run(_load(port, big, args.concurrency, args.duration))
            ours_1, bare_1 = _median(rounds["ours"]), _median(rounds["bare"])
    finally:
        tr.stop.set()
        _stop(ours)
        if bare is not None:
            _stop(bare)
        service.close()
        server.stop(None)
    result = {
        "bench": "serve",
        "freshness_p50_s": round(statistics.median(fresh), 4),
        "freshness_p99_s": round(_pct(fresh, 0.99), 4),
        "freshness_max_s": round(max(fresh), 4),
        "predict_p50_ms": round(ours_1["p50_ms"], 3),
        "predict_p99_ms": round(ours_1["p99_ms"], 3),
        "rps": round(ours_1["rps"], 1),
        "examples_per_s": round(ours_256["rps"] * 256, 1),
        "batch256_p99_ms": round(ours_256["p99_ms"], 3),
        "bare_rps": round(bare_1["rps"], 1),
        "bare_p50_ms": round(bare_1["p50_ms"], 3),
        "bare_p99_ms": round(bare_1["p99_ms"], 3),
        "rps_vs_bare": round(ours_1["rps"] / bare_1["rps"], 3),
        "rps_rounds": [round(r["rps"], 1) for r in rounds["ours"]],
        "bare_rps_rounds": [round(r["rps"], 1) for r in rounds["bare"]],
        "errors": int(ours_1["errors"] + ours_256["errors"] + bare_1["errors"]),
        "train_steps_during_freshness": tr.steps,
        "probes": len(fresh),
        "concurrency": args.concurrency,
        "sync_interval_s": args.sync_interval,
        "rows_per_table": args.rows,
        "machine": machine_info(),
    }
    emit(result, args.json)
    return 0


if __name__ == "__main__":  # the bare anchor: python -m benchmarks.bench_serve --bare PATH PORT
    if len(sys.argv) == 4 and sys.argv[1] == "--bare":
        _bare_main(sys.argv[2], int(sys.argv[3]))
