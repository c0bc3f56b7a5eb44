"""Shared fixtures. Tests that need real services (NIXL peers, a Hub server, redis) live in their own modules."""

from __future__ import annotations

import pytest

from mx_orchestrator import ModelIdentity


@pytest.fixture
def identity() -> ModelIdentity:
    return ModelIdentity("acme/tiny-model", "main")
