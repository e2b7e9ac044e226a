"""``monolith trainer``: one trainer of a multi-process job (trainers x PS shards).

Each trainer process

* reads its own share of the examples topic's partitions
  (``KafkaExampleSource(rank=r, world_size=w)``), prefetched by a reader thread;
* keeps the sparse rows on the PS shards through a :class:`~monolith_py.ps.PSClient`
  (``--ps host:port,...``), or, without ``--ps``, in one in-process shard (single-process
  mode, the same :class:`~monolith_py.ps.PSShard` object without RPC);
* keeps the dense layers as a data-parallel replica: same seed, broadcast from rank 0,
  gradients averaged every step with one gloo ``all_reduce``
  (:class:`~monolith_py.ps.DataParallelOptimizer`);
* trains with :class:`~monolith_py.training.OnlineTrainer` (score, then train).

Trainers may run out of data at different times, or have none for a while: a trainer
without a batch joins the step's all-reduce with no gradients (``idle_step``), and the job
ends in the round where no trainer has data left -- never a deadlock. A PS shard that stays
down past ``ps.deadline_s`` makes the trainer exit with a retriable error naming it (the
supervisor restarts the job from its snapshot); it never hangs.

Example (two trainers, two shards; see ``examples/job.toml``)::

    monolith ps --config job.toml --shard 0 &  monolith ps --config job.toml --shard 1 &
    monolith trainer --config job.toml --rank 0 --world-size 2 &
    monolith trainer --config job.toml --rank 1 --world-size 2
"""

from __future__ import annotations

import datetime
import logging
import math
import queue
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

from monolith_py.errors import ConfigError

if TYPE_CHECKING:
    from monolith_py.batch import Batch
    from monolith_py.jobconfig import JobConfig

__all__ = ["build_model", "model_spec", "run_trainer", "kafka_batches", "add_arguments", "main"]

log = logging.getLogger("monolith.trainer")

_IDLE_WAIT_S = 0.25  # a trainer without a batch this long joins the round without one
_END = object()


def model_spec(job: JobConfig, num_dense: int) -> Any:
    """The :class:`~monolith_py.modules.spec.ModelSpec` of the job's model: a DLRM over the
    job's tables. Serving builds the same model from it (dense sync)."""
    from monolith_py.modules.spec import ModelSpec

    tables = job.require_tables()
    dims = {t.dim for t in tables}
    m = job.model
    if m.interaction == "dot" and len(dims) != 1:
        raise ConfigError(f"model.interaction 'dot' needs one dim for every table, got "
                          f"{sorted(dims)}; use interaction = \"cat\"")
    bottom = (*m.bottom_mlp, max(dims)) if num_dense else ()
    return ModelSpec.dlrm(tables, num_dense, bottom, m.top_mlp, m.interaction)


def build_model(job: JobConfig, num_dense: int, backend: Any) -> tuple[Any, Any]:
    """``(model, dense optimizer)``: the job's model (:func:`model_spec`) with rows in
    ``backend``, seeded with ``trainers.seed`` so every trainer starts from the same
    weights."""
    import torch

    model = model_spec(job, num_dense).build(backend, seed=job.trainers.seed)
    m = job.model
    cls = {"adagrad": torch.optim.Adagrad, "adam": torch.optim.Adam,
           "sgd": torch.optim.SGD}[m.dense_optimizer]
    return model, cls(model.parameters(), lr=m.dense_lr)


def kafka_batches(job: JobConfig, rank: int) -> Any:
    """The trainer's :class:`~streaming.source.KafkaExampleSource` (its partitions)."""
    from streaming.source import KafkaExampleSource

    k, t = job.kafka, job.trainers
    return KafkaExampleSource(k.bootstrap_servers, k.topic, rank=rank,
                              world_size=t.world_size, batch_size=t.batch_size,
                              max_wait_s=t.max_wait_s, dead_letter_topic=k.dead_letter_topic,
                              end_of_stream=k.end_of_stream)


_COMMIT_EVERY_S = 5.0
"""Without snapshots, how often the trained position is committed for lag tools."""


class _Prefetch:
    """Iterates a source on a daemon thread (decode overlaps training); ``get(timeout)``
    returns a batch, ``None`` on timeout, or ``_END``. Only that thread touches the
    source until :meth:`close` (which stops it, waits for the thread, then closes it)."""

    def __init__(self, source: Iterable[Any]) -> None:
        self._source = source
        self._q: queue.Queue[Any] = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._position = getattr(source, "state_dict", None)
        self.last_offsets: dict[int, int] | None = None  # after the last batch get() returned
        self._thread = threading.Thread(target=self._run, name="trainer-source", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for batch in self._source:  # position read before the next batch is asked for
                pos = self._position() if callable(self._position) else None
                if not self._put((batch, pos)):
                    return
        except BaseException as exc:  # handed to the training thread
            self._error = exc
        self._put(_END)

    def get(self, timeout: float | None) -> Any:
        try:
            item = self._q.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is _END and self._error is not None:
            raise self._error
        if isinstance(item, tuple):
            item, self.last_offsets = item
        return item

    def close(self) -> None:
        self._stop.set()
        stop = getattr(self._source, "stop", None)
        if callable(stop):
            stop()
        self._thread.join(timeout=30)
        close = getattr(self._source, "close", None)
        if callable(close) and not self._thread.is_alive():
            close()


def _agree_num_dense(local: int, world_size: int) -> int:
    if world_size == 1:
        return local
    import torch
    import torch.distributed as dist

    t = torch.tensor([local], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _global_metrics(trainer: Any, world_size: int) -> dict[str, Any]:
    """AUC and log loss over every trainer's examples (histograms summed)."""
    import torch

    from monolith_py.training import histogram_auc

    st = trainer.progressive.state_dict()
    pos, neg = st["pos_hist"].clone(), st["neg_hist"].clone()
    sums = torch.tensor([float(st["count"]), float(st["sums"][2])], dtype=torch.float64)
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(pos)
        dist.all_reduce(neg)
        dist.all_reduce(sums)
    auc, _ = histogram_auc(pos, neg)
    n = float(sums[0])
    return {"global_auc": auc, "global_log_loss": float(sums[1]) / n if n else math.nan,
            "global_examples": int(n)}


def run_trainer(job: JobConfig, rank: int = 0, *, source: Iterable[Batch] | None = None,
                max_steps: int | None = None,
                progress: Callable[[dict[str, Any]], None] | None = None,
                progress_every: int = 50, snapshots: Any = None,
                finish_on_signal: bool = False) -> dict[str, Any]:
    """Run trainer ``rank`` of ``job.trainers.world_size`` until its source ends (and every
    other trainer's) or ``max_steps`` batches. ``source`` defaults to the Kafka topic.
    Returns the trainer's final metrics plus ``global_auc``/``global_log_loss`` over all
    trainers. ``snapshots``: :class:`~monolith_py.snapshot.loop.LoopSettings` (restore at
    start, ledger, snapshots at step boundaries). ``finish_on_signal``: SIGUSR1 makes the
    trainer read to the topic's current end and finish normally (``monolith up``).

    Observability: a heartbeat (``trainer/<rank>``) every loop iteration, even while
    waiting for data, step times, and the progressive metrics as gauges every second
    (:mod:`monolith_py.observe.heartbeat`, :mod:`monolith_py.observe.export`)."""
    import time

    import torch
    import torch.distributed as dist

    from monolith_py.ps import (
        ClientOptions,
        DataParallelOptimizer,
        PSClient,
        ShardedBackend,
        broadcast_parameters,
    )
    from monolith_py.observe.export import export_training
    from monolith_py.observe.heartbeat import Heartbeat
    from monolith_py.training import OnlineTrainer, TrainerConfig

    world = job.trainers.world_size
    if not 0 <= rank < world:
        raise ConfigError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world}")
    tables = job.require_tables()
    if world > 1 and not job.ps.addresses:
        raise ConfigError("several trainers need shared PS shards: give --ps host:port,... "
                          "(ps.addresses)")
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=job.trainers.dist_init, rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=job.trainers.dist_timeout_s))
    backend: Any
    client: PSClient | None = None
    feed: _Prefetch | None = None
    snaps: Any = None
    committer: Any = None
    try:
        if job.ps.addresses:
            client = PSClient(job.ps.addresses, tables, ClientOptions(
                deadline_s=job.ps.deadline_s, connect_timeout_s=job.ps.connect_timeout_s,
                max_message_bytes=job.ps.max_message_bytes, async_push=job.ps.async_push))
            backend = client
        else:
            backend = ShardedBackend.build(tables, 1)
        src = source if source is not None else kafka_batches(job, rank)
        hb = Heartbeat(f"trainer/{rank}")
        if finish_on_signal:
            _finish_on_sigusr1(src)
        if snapshots is not None and snapshots.enabled:
            from monolith_py.snapshot.loop import LoopSnapshots

            snaps = LoopSnapshots(snapshots, rank, world, ps_addresses=job.ps.addresses,
                                  local_shard=None if client is not None else backend.shards[0])
            snaps.restore_begin(src)  # seeks src to the snapshot's offsets
        if job.kafka.group_id is not None:  # positions for lag tools, never read back
            from streaming.offsets import OffsetCommitter

            committer = OffsetCommitter(job.kafka.bootstrap_servers, job.kafka.topic,
                                        job.kafka.group_id)
            if snaps is not None:
                snaps.on_durable = committer.submit
        feed = _Prefetch(src)
        first = feed.get(1.0)
        while first is None:  # waiting for the first batch is not a hang
            hb.beat()
            first = feed.get(1.0)
        first = None if first is _END else first
        local_dense = int(first.dense.shape[1]) if first is not None else -1
        num_dense = job.model.num_dense
        agreed = _agree_num_dense(local_dense if num_dense is None else num_dense, world)
        if agreed < 0:
            log.warning("trainer %d: no trainer got any example", rank)
            return {"examples": 0, "steps": 0, "rank": rank, "world_size": world}
        model, inner = build_model(job, agreed, backend)
        dp: DataParallelOptimizer | None = None
        if world > 1:
            broadcast_parameters(model)
            dp = DataParallelOptimizer(inner)
        # DataParallelOptimizer duck-types torch.optim.Optimizer (zero_grad, step, state)
        opt = cast("torch.optim.Optimizer", dp) if dp is not None else inner
        trainer = OnlineTrainer(model, opt, TrainerConfig(
            evict_interval_s=job.trainers.evict_interval_s,
            metrics_window=job.trainers.metrics_window))
        if snaps is not None:
            snaps.restore_finish(trainer)
        dense_pusher = _dense_pusher(job, rank, agreed, model)
        done = 0
        pending = first
        exhausted = first is None
        idle_rounds = 0
        exported = committed = 0.0
        while True:
            batch = pending
            pending = None
            if batch is None and not exhausted and (max_steps is None or done < max_steps):
                got = feed.get(_IDLE_WAIT_S if dp is not None else 1.0)
                if got is _END:
                    exhausted = True
                else:
                    batch = got
            if max_steps is not None and done >= max_steps:
                exhausted, batch = True, None
            if batch is None:
                hb.beat()
                if dp is None:
                    if exhausted:
                        break
                    continue
                idle_rounds += 1
                if not dp.idle_step(alive=not exhausted) and exhausted:
                    break
                if snaps is not None:  # every rank decides every round, idle or not
                    snaps.at_boundary(dp.rounds, trainer, feed.last_offsets,
                                      client.flush if client is not None else None)
                continue
            before = dp.rounds if dp is not None else 0
            t_step = time.perf_counter()
            result = trainer.step(batch)
            hb.step(time.perf_counter() - t_step, examples=len(batch))
            done += 1
            if dp is not None and dp.rounds == before:
                dp.idle_step(alive=True)  # this batch was skipped: join the round anyway
            if snaps is not None:
                snaps.after_step(batch, result)
                snaps.at_boundary(dp.rounds if dp is not None else done, trainer,
                                  feed.last_offsets, client.flush if client is not None else None)
            if dense_pusher is not None:
                dense_pusher.maybe_push()
            if progress is not None and done % progress_every == 0:
                progress(trainer.metrics())
            if time.monotonic() - exported >= 1.0:
                exported = time.monotonic()
                export_training(trainer.metrics(tables=False), hb.role)
            if committer is not None and snaps is None and feed.last_offsets and (
                    time.monotonic() - committed >= _COMMIT_EVERY_S):
                committed = time.monotonic()
                committer.submit(feed.last_offsets)
        if client is not None:
            client.flush()
        if committer is not None and snaps is None and feed.last_offsets:
            committer.submit(feed.last_offsets)  # the trained position at the end
        if dense_pusher is not None:
            dense_pusher.push()  # serving gets the final dense weights
        final = trainer.metrics()
        export_training(final, hb.role)
        final.update(_global_metrics(trainer, world))
        final.update(rank=rank, world_size=world, idle_rounds=idle_rounds,
                     rounds=dp.rounds if dp is not None else final["steps"])
        if snaps is not None:
            snaps.wait_idle()
            final.update(ledger=snaps.ledger.state_dict(), offsets=feed.last_offsets,
                         snapshots=snaps.snapshots, snapshot_failures=snaps.failures)
        if progress is not None:
            progress(final)
        return final
    finally:
        if snaps is not None:
            snaps.close()
        if committer is not None:
            committer.close()  # after the last seal's positions were handed over
        if feed is not None:
            feed.close()
        if client is not None:
            try:
                client.close()
            except Exception:  # already failing or closing: do not mask the first error
                log.debug("closing the PS client failed", exc_info=True)
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()



def _dense_pusher(job: JobConfig, rank: int, num_dense: int, model: Any) -> Any:
    """Rank 0 publishes the dense weights to PS shard 0's sync service (serving workers
    take them from there); ``None`` without PS shards or with the interval at 0."""
    interval = job.trainers.dense_sync_interval_s
    if rank != 0 or not job.ps.addresses or interval <= 0:
        return None
    from monolith_py.sync.dense import DensePusher
    from monolith_py.sync.service import SyncClient

    return DensePusher(SyncClient(job.ps.addresses[0]), model_spec(job, num_dense).to_dict(),
                       model, interval_s=interval)


def _finish_on_sigusr1(source: Any) -> None:
    """SIGUSR1 (from ``monolith up`` once the stream's producers are done): the source
    reads to the partition ends as they are then, and the trainer finishes normally."""
    import signal

    finish = getattr(source, "finish", None)
    if callable(finish) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, lambda *_: finish())


# -- command line ---------------------------------------------------------------------------

def add_arguments(p: Any) -> None:
    """The flags of ``monolith trainer`` (each overrides the job config)."""
    import os

    from monolith_py.ps.cli import add_job_arguments

    p.add_argument("--rank", type=int, default=0, help="this trainer's rank")
    p.add_argument("--world-size", type=int, default=None,
                   help="number of trainers (trainers.world_size)")
    p.add_argument("--ps", default=None,
                   help="PS shard addresses host:port,... in shard order (ps.addresses); "
                        "none: one in-process shard")
    p.add_argument("--bootstrap-servers", default=None,
                   help="Kafka bootstrap servers (kafka.bootstrap_servers; default "
                        "$MONOLITH_BOOTSTRAP_SERVERS or 127.0.0.1:9092)")
    p.add_argument("--topic", default=None, help="examples topic (kafka.topic)")
    p.add_argument("--batch-size", type=int, default=None, help="trainers.batch_size")
    p.add_argument("--dist-init", default=os.environ.get("MONOLITH_DIST_INIT"),
                   help="torch.distributed init method, e.g. tcp://host:29500 "
                        "(trainers.dist_init)")
    p.add_argument("--end-of-stream", action="store_true", default=None,
                   help="stop at the partition ends seen at start (kafka.end_of_stream)")
    p.add_argument("--group-id", default=None,
                   help="commit the trained positions under this consumer group for lag "
                        "tools (kafka.group_id; never read back)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--every", type=int, default=50, help="print progress every N batches")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics (heartbeat, step time, AUC...) on this port")
    add_job_arguments(p)
    from monolith_py.snapshot.cli import add_trainer_snapshot_arguments

    add_trainer_snapshot_arguments(p)  # --smp-group, --snapshot-every-steps, --restore ...


def main(args: Any) -> int:
    """``monolith trainer``: run, print progress lines and a final JSON summary."""
    import json

    from monolith_py.jobconfig import load_job
    from monolith_py.ps.cli import job_overrides
    from monolith_py.training import format_progress

    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("kafka").setLevel(logging.WARNING)
    job = load_job(args.config, job_overrides(args, **{
        "trainers.world_size": args.world_size, "ps.addresses": args.ps,
        "kafka.bootstrap_servers": args.bootstrap_servers, "kafka.topic": args.topic,
        "trainers.batch_size": args.batch_size, "trainers.dist_init": args.dist_init,
        "kafka.end_of_stream": args.end_of_stream, "kafka.group_id": args.group_id}))

    def show(m: dict[str, Any]) -> None:
        print(f"[trainer {args.rank}] {format_progress(m)}", flush=True)

    if args.metrics_port is not None:
        from monolith_py.observe.metrics import serve_metrics

        serve_metrics(args.metrics_port)

    from monolith_py.snapshot.cli import trainer_snapshot_settings

    final = run_trainer(job, args.rank, max_steps=args.max_steps, progress=show,
                        progress_every=max(1, args.every),
                        snapshots=trainer_snapshot_settings(args), finish_on_signal=True)
    keys = ("rank", "world_size", "examples", "trained_examples", "steps", "rounds",
            "idle_rounds", "bad_batches", "auc", "log_loss", "global_auc",
            "global_log_loss", "global_examples", "examples_per_s", "rows", "event_time",
            "ledger", "offsets", "snapshots", "snapshot_failures")
    print(json.dumps({k: final.get(k) for k in keys}, default=str), flush=True)
    return 0
