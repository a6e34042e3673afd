"""Fixtures the unit tests share."""

from __future__ import annotations

import pytest

from distinfer.coordinator.memory_store import MemoryStore
from distinfer.coordinator.store import Store


@pytest.fixture
def store(tmp_path):
    """A coordinator store in a fresh folder."""
    s = Store(tmp_path / "state.db")
    yield s
    s.close()


@pytest.fixture(params=["sqlite", "memory"])
def any_store(request, tmp_path):
    """Each JobStore in turn (coordinator/job_store.py): a module whose tests are the stores' contract takes
    `store` from this."""
    s = Store(tmp_path / "state.db") if request.param == "sqlite" else MemoryStore()
    yield s
    s.close()
