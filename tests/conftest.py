"""Shared pytest configuration for every tier (unit, integration, e2e)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# Deterministic property tests on a loaded 2-core machine: fixed seed, no deadlines.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Session-wide local Kafka-protocol broker (`kafka_broker` fixture), from streaming/.
from streaming.testing import kafka_broker  # noqa: E402,F401
