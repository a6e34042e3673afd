"""Fuzz every RPC of both services of a real in-process coordinator with random and malformed messages.

Two kinds of bad input reach each RPC:
  (a) structurally valid protobufs with random field values (hypothesis strategies, in fuzz_strategies.py), and
  (b) raw random bytes as the request payload, sent through generic calls with identity serializers.
Every call must end with OK or a specific status (never UNKNOWN or INTERNAL, see `check` for the one narrow
exception grpcio forces on us), the server must keep running, and afterwards it must still take a good job.

Examples per test: DISTINFER_FUZZ_EXAMPLES (default 40); the runs are derandomized, so CI is repeatable.
Run with -s to see the statuses each RPC answered, per module. The calls, their checks and the statuses each
RPC may answer are in fuzz_harness.py; this file holds the fixtures.
"""

from __future__ import annotations

import pytest
from fuzz_harness import LIMITS, SEEN, Stubs, assert_still_serves

from distinfer.common.channels import open_channel


@pytest.fixture(scope="module", autouse=True)
def _print_statuses_seen():
    yield
    print("\nfuzz: statuses seen per RPC (calls: status counts)")
    for rpc in sorted(SEEN):
        counts = SEEN[rpc]
        print(f"  {rpc:32} {sum(counts.values()):5}: {dict(counts.most_common())}")
    SEEN.clear()


@pytest.fixture
def fuzzed(tmp_path, coordinator_class):
    """A coordinator with small limits (so RESOURCE_EXHAUSTED is cheap to reach); checked after the test."""
    server = coordinator_class(tmp_path / "state", limits=LIMITS)
    server.address = server.start()
    try:
        yield server
        assert_still_serves(server)
    finally:
        server.stop()


@pytest.fixture
def stubs(fuzzed):
    with open_channel(fuzzed.address) as channel:
        yield Stubs(channel)
