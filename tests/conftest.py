"""Shared test configuration: a small, derandomized hypothesis profile (CI has 2 cores) and a seeded rng."""

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Few examples and a fixed seed keep the property tests in seconds and make a CI failure reproducible; no example
# database, so tests write nothing into the checkout.
settings.register_profile("deploy_ctc", max_examples=15, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("deploy_ctc")


@pytest.fixture
def rng(request):
    """A numpy Generator seeded from the test's id, so each parametrization draws its own reproducible inputs."""
    seed = sum(ord(ch) * (i + 1) for i, ch in enumerate(request.node.nodeid))
    return np.random.default_rng(seed)
