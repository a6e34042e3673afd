"""Shared fixtures: an in-process coordinator for unit tests. Integration fixtures live in integration/."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from distinfer.client.api import Client
from distinfer.coordinator.server import Coordinator, CoordinatorConfig


class InProcessCoordinator:
    """A real coordinator server on a free port, run on an event loop in a background thread."""

    def __init__(self, state_dir: Path, **config):
        self.config = CoordinatorConfig(**{"listen": "127.0.0.1:0", "state_dir": state_dir, **config})
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.coordinator: Coordinator | None = None

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def start(self) -> str:
        self.thread.start()

        async def start():
            self.coordinator = Coordinator(self.config)
            await self.coordinator.start()

        self.call(start())
        return f"127.0.0.1:{self.coordinator.port}"

    def stop(self) -> None:
        self.call(self.coordinator.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def coordinator_class():
    """For tests that start, stop and restart coordinators themselves."""
    return InProcessCoordinator


@pytest.fixture
def coordinator(tmp_path):
    server = InProcessCoordinator(tmp_path / "state")
    server.address = server.start()
    yield server
    server.stop()


@pytest.fixture
def client(coordinator):
    with Client(coordinator.address) as c:
        yield c
