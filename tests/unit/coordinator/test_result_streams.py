"""A result stream follows its job: a read per commit, every row once and in order, the end with the job."""

from __future__ import annotations

import asyncio

from store_rows import commit

from distinfer.coordinator.job import Job, JobState
from distinfer.coordinator.jobs import JobManager
from distinfer.coordinator.registry import Registry
from distinfer.coordinator.result_streams import ResultStreams
from distinfer.coordinator.store import Store
from distinfer.v1 import jobs_pb2 as S


def test_a_stream_reads_once_a_commit_and_not_again_until_the_next(tmp_path):
    """A read that stopped at a row not committed is not followed by another right away, nor after a change of
    the job that committed nothing (an upload's message, a rank joining): at a model's pace those empty reads
    were most of a stream's store reads."""

    async def scenario():
        manager = JobManager(Store(tmp_path / "state.sqlite"), Registry())
        status = S.JobStatus(job_id="j", state=S.RUNNING, num_rows=30, created_at=1.0)
        manager.store.create_job(status)
        manager.store.add_rows("j", 0, S.RowBatch(rows=[S.InputRow(text="x")] * 30))
        job = manager.jobs["j"] = Job.from_status(status)
        read, reads = manager.store.results_from, []
        manager.store.results_from = lambda *args: reads.append(args[1]) or read(*args)

        received = []

        async def follow():
            async for batch in ResultStreams(manager).stream("j", 0):
                received.extend(result.index for result in batch.results)

        following = asyncio.create_task(follow())
        await asyncio.sleep(0.2)
        for n in range(3):
            job.notify()  # a change, but no commit
            await asyncio.sleep(0.2)
            assert reads == [0, *(10 * k for k in range(n))]
            commit(manager.store, "j", 1, [S.Result(index=i, echo=S.Echo(chars=1)) for i in range(10 * n, 10 * n + 10)])
            job.rows_done += 10  # as JobManager.commit counts them
            job.notify()
            await asyncio.sleep(0.2)  # time for a read the stream would make at once
            assert received == list(range(10 * n + 10))
            assert reads == [0, *(10 * k for k in range(n + 1))]  # the first (nothing yet), then one a commit
        job.move_to(JobState.SUCCEEDED, "done")
        await asyncio.wait_for(following, 10)
        assert reads == [0, 0, 10, 20, 30] and received == list(range(30))
        await manager.close()

    asyncio.run(scenario())
