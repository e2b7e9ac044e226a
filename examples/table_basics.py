"""A tour of the collisionless embedding table (what `make demo` runs).

Creates a table, trains a few steps with apply_gradients, shows frequency admission,
event-time expiry, change tracking, stats and an exact state round trip.
"""

from __future__ import annotations

import numpy as np
import torch

from monolith_py.table import EmbeddingTable, OptimizerConfig, TableConfig


def main() -> None:
    config = TableConfig(
        "item",
        dim=8,
        optimizer=OptimizerConfig("adagrad", lr=0.1),
        admit_threshold=2,  # an id gets a row on its second sighting
        ttl_seconds=3600,  # ... and loses it after an hour without updates
        seed=7,
    )
    table = EmbeddingTable(config)
    print(f"created {table!r} with {config.optimizer.kind}, admit_threshold=2, ttl=3600 s")

    # Huge, sparse ids: each gets its own row, no hashing-trick collisions.
    popular = torch.tensor([42, 10**15, -7])
    t0 = 1_700_000_000
    print("\n-- training (event time advances 60 s per step)")
    for step in range(4):
        now = t0 + 60 * step
        one_off = torch.tensor([1_000_000 + step])  # seen once, never admitted
        ids = torch.cat([popular, popular[:1], one_off])  # 42 twice: grads are summed
        rows = table.lookup(ids, train=True)  # forward pass reads the rows
        target = torch.ones_like(rows)
        grads = 2 * (rows - target)  # d/d(rows) of ||rows - 1||^2
        table.apply_gradients(ids, grads, now)
        loss = float(((rows - target) ** 2).sum(dim=1)[:3].mean())
        print(
            f"step {step}: {len(table)} rows, loss on popular ids {loss:7.3f}, "
            f"filtered grads so far {table.stats()['filtered']}"
        )

    print("\n-- admission: popular ids got rows on their 2nd sighting, one-offs never did")
    print("row of 42     :", np.round(table.lookup(torch.tensor([42]))[0].numpy(), 3))
    print("row of 1000000:", table.lookup(torch.tensor([1_000_000]))[0].numpy())

    print("\n-- change tracking (what sync/incremental snapshots read)")
    v = table.version
    table.apply_gradients(torch.tensor([42]), torch.ones(1, 8), now=t0 + 300)
    delta = table.changes_since(v)
    print(f"since version {v}: rows {delta.keys.tolist()}, deleted {delta.deleted_keys.tolist()}")

    print("\n-- expiry on event time: -7 and 10**15 were last updated at t0+180")
    evicted = table.evict_expired(now=t0 + 180 + 3601)
    print(f"evicted {evicted.tolist()}; {len(table)} row(s) left")
    delta = table.changes_since(v)
    print(f"since version {v}: rows {delta.keys.tolist()}, deleted {delta.deleted_keys.tolist()}")

    print("\n-- stats")
    for key, value in table.stats().items():
        print(f"  {key:<20} {value}")

    print("\n-- state round trip (key-sorted arrays, no pickles)")
    state = table.state_dict()
    print("  fields:", ", ".join(sorted(state)))
    clone = EmbeddingTable(config)
    clone.load_state_dict(state)
    same = all(
        np.array_equal(a, state[name]) if isinstance(a, np.ndarray) else a == state[name]
        for name, a in clone.state_dict().items()
    )
    ids = torch.tensor([42, 10**15, -7])
    print(f"  clone state identical: {same}; lookups equal: "
          f"{torch.equal(clone.lookup(ids), table.lookup(ids))}")


if __name__ == "__main__":
    main()
