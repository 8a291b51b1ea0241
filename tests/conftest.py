"""Shared test configuration: a small, derandomized hypothesis profile (CI has 2 cores), a seeded rng, and skips
turned into failures for what ``DEPLOY_CTC_REQUIRE`` says the environment has (tests/utils/require.py)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from tests.utils import require

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


_REQUIRED = pytest.StashKey[set]()


def pytest_configure(config):
    try:
        config.stash[_REQUIRED] = require.required()
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None


def _fail_required_skip(report, config):
    """Where DEPLOY_CTC_REQUIRE is set, turn ``report`` (a skip) into a failure when its reason is the absence of a
    listed capability, or of no known capability at all."""
    required = config.stash[_REQUIRED]
    if not report.skipped or not required:
        return
    reason = require.skip_reason(report)
    missing = require.capabilities_missing(reason)
    if not missing:
        report.outcome = "failed"
        report.longrepr = f"skipped for a reason that names no capability of tests/utils/require.py: {reason}"
    elif set(missing) & required:
        report.outcome = "failed"
        report.longrepr = f"skipped, but {require.ENV} requires {sorted(set(missing) & required)} here: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_required_skip(outcome.get_result(), item.config)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_required_skip(outcome.get_result(), collector.config)
