"""Fixtures the unit tests share."""

from __future__ import annotations

import pytest

from distinfer.coordinator.store import Store


@pytest.fixture
def store(tmp_path):
    """A coordinator store in a fresh folder."""
    s = Store(tmp_path / "state.db")
    yield s
    s.close()
