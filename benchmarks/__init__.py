"""Benchmarks, run as ``monolith bench <name> --json``.

Each benchmark prints one JSON object with our number beside an anchor measured in the
same run (ratios hold on noisy machines; absolute times don't). Results and the machine
they were measured on are recorded in ``docs/benchmarks.md``.
"""
