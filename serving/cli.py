"""``monolith serve``: a serving worker following PS shards, with the HTTP API.

Example::

    monolith serve --ps 127.0.0.1:50051,127.0.0.1:50052 --port 8080
    monolith serve --openapi docs/openapi.json      # write the OpenAPI spec and exit
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register", "openapi_document"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve", help="serve predictions over HTTP from embeddings synced from the PS shards",
        description="Follow every PS shard (deltas every --sync-interval seconds, dense "
                    "weights from shard 0) and answer POST /v1/predict.")
    p.add_argument("--ps", default="",
                   help="host:port of each PS shard's gRPC server, comma-separated, in shard "
                        "order (shard 0 also serves the dense model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="HTTP listen address (default 127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8080, help="HTTP port (0: pick a free one)")
    p.add_argument("--sync-interval", type=float, default=1.0,
                   help="seconds between sync messages from each shard (default 1)")
    p.add_argument("--fp16", action="store_true",
                   help="float16 embedding rows on the wire and in memory")
    p.add_argument("--max-examples", type=int, default=1024, help="examples per request")
    p.add_argument("--max-ids-per-feature", type=int, default=4096,
                   help="ids of one feature in one example")
    p.add_argument("--max-body-bytes", type=int, default=16 << 20, help="request body limit")
    p.add_argument("--max-batch", type=int, default=2048,
                   help="most examples in one model call (micro-batching)")
    p.add_argument("--max-wait-ms", type=float, default=0.0,
                   help="extra wait for more requests before a model call (default 0)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--batching", choices=("thread", "inline"), default="thread",
                   help="run the model on a batcher thread (default) or on the event loop")
    p.add_argument("--openapi", metavar="PATH", default=None,
                   help="write the OpenAPI spec (JSON) to PATH ('-': stdout) and exit")
    p.set_defaults(func=_run)


def openapi_document(limits: Any = None) -> dict[str, Any]:
    """The OpenAPI spec of the API with ``limits`` (default limits when None)."""
    from serving.app import create_app
    from serving.batcher import MicroBatcher
    from serving.schema import ApiLimits
    from serving.store import ServingStore

    store = ServingStore(shards=1)
    batcher: MicroBatcher[Any, Any] = MicroBatcher(store.predict, size=lambda p: p.n)
    try:
        app = create_app(store, batcher, limits or ApiLimits())
        return app.fastapi.openapi()  # type: ignore[no-any-return]
    finally:
        batcher.close()


def _run(args: argparse.Namespace) -> int:
    import json
    import sys

    from monolith_py.errors import ConfigError
    from serving.schema import ApiLimits
    from serving.worker import ServeConfig, ServingWorker

    limits = ApiLimits(max_examples=args.max_examples,
                       max_ids_per_feature=args.max_ids_per_feature,
                       max_body_bytes=args.max_body_bytes)
    if args.openapi:
        text = json.dumps(openapi_document(limits), indent=2, sort_keys=True) + "\n"
        if args.openapi == "-":
            sys.stdout.write(text)
        else:
            with open(args.openapi, "w") as f:
                f.write(text)
        return 0
    ps = tuple(a.strip() for a in args.ps.split(",") if a.strip())
    if not ps:
        raise ConfigError("--ps is required: host:port of every PS shard, comma-separated")
    config = ServeConfig(ps=ps, host=args.host, port=args.port,
                         sync_interval_s=args.sync_interval, fp16=args.fp16, limits=limits,
                         max_batch_examples=args.max_batch, max_wait_ms=args.max_wait_ms,
                         torch_threads=args.torch_threads, batching=args.batching)
    ServingWorker(config).serve_forever()
    return 0
