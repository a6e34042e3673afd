"""How the coordinator calls its store: on the event loop, one call at a time, and a long call (deleting a job) on
a thread of its own while the loop serves on and the other store calls wait for it."""

from __future__ import annotations

import asyncio
import threading

from distinfer.coordinator.jobs import JobManager
from distinfer.coordinator.memory_store import MemoryStore
from distinfer.coordinator.registry import Registry


def test_a_store_call_runs_on_the_event_loop_thread():
    async def scenario():
        jobs = JobManager(MemoryStore(), Registry())
        called_on = await jobs.db(threading.get_ident)
        await jobs.close()
        return called_on

    assert asyncio.run(scenario()) == threading.get_ident()


def test_a_call_on_the_store_thread_has_the_store_to_itself_while_the_loop_serves_on():
    order: list[str] = []
    release = threading.Event()

    def long_call():
        release.wait(10)
        order.append("long call")
        return threading.get_ident()

    async def scenario():
        jobs = JobManager(MemoryStore(), Registry())
        deleting = asyncio.create_task(jobs.db_in_thread(long_call))
        await asyncio.sleep(0.05)
        order.append("loop served")  # the loop is not blocked by the long call
        calling = asyncio.create_task(jobs.db(lambda: order.append("other call")))
        await asyncio.sleep(0.05)
        assert order == ["loop served"]  # the other call waits for the long one
        release.set()
        ran_on = await deleting
        await calling
        await jobs.close()
        return ran_on

    assert asyncio.run(scenario()) != threading.get_ident()
    assert order == ["loop served", "long call", "other call"]


def test_a_cancelled_caller_leaves_its_call_on_the_store_thread_to_finish_before_any_other():
    order: list[str] = []
    release = threading.Event()

    def long_call():
        release.wait(10)
        order.append("long call")

    async def scenario():
        jobs = JobManager(MemoryStore(), Registry())
        deleting = asyncio.create_task(jobs.db_in_thread(long_call))
        await asyncio.sleep(0.05)
        deleting.cancel()  # a handler cancelled at shutdown, say
        calling = asyncio.create_task(jobs.db(lambda: order.append("other call")))
        await asyncio.sleep(0.05)
        assert deleting.cancelled() and order == []
        release.set()
        await calling
        await jobs.close()

    asyncio.run(scenario())
    assert order == ["long call", "other call"]
