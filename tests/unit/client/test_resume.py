"""Result streams followed through trouble: one cut by a coordinator restart resumes at the next row; one the
caller leaves while it waits (Ctrl-C) ends at once on the coordinator, cancelled rather than left open for as
long as the interrupt's traceback keeps the call alive."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from distinfer.client.api import Client
from distinfer.coordinator.job import Job
from distinfer.v1 import jobs_pb2 as S
from tests.helpers import interrupt_soon, wait_until
from tests.ports import free_port


def test_a_result_stream_interrupted_while_it_waits_is_cancelled_on_the_coordinator(coordinator, client):
    job = client.submit(["one", "two"], model="", task="echo")  # no worker here: it waits in the queue
    held = coordinator.coordinator.manager.jobs[job.id]
    batches = job.result_batches()
    interrupt_soon(0.5)
    with pytest.raises(KeyboardInterrupt) as interrupted:  # (its traceback holds the stream's frames)
        next(batches)
    wait_until(lambda: held.readers == 0, 5, "the coordinator to see the result stream end")
    assert interrupted.value is not None and held.readers == 0


def test_a_result_stream_cut_by_a_coordinator_restart_resumes_at_the_next_row(tmp_path, coordinator_class, capsys):
    rows, port = 40_000, free_port()  # 40,000 vectors: ten messages, more than the client holds unread
    first = coordinator_class(tmp_path / "state", listen=f"127.0.0.1:{port}")
    address = first.start()
    manager = first.coordinator.manager
    status = S.JobStatus(job_id="j-r", spec=S.JobSpec(task="embed", model="m"), state=S.SUCCEEDED, created_at=1.0)
    status.num_rows = status.rows_done = rows
    results = pa.table(
        {
            "index": pa.array(range(rows), pa.uint64()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.arange(rows * 384, dtype=np.float32)), 384),
        }
    )

    async def an_ended_job_with_its_results():
        await manager.db(manager.store.create_job, status)
        await manager.db(manager.store.add_rows, "j-r", 0, S.RowBatch(rows=[S.InputRow(text="x")] * rows))
        await manager.db(manager.store.commit_results, "j-r", 1, results)
        manager.jobs["j-r"] = Job.from_status(status)

    first.call(an_ended_job_with_its_results())
    with Client(address) as client:
        batches = client.job("j-r").result_batches()
        read = [next(batches)]
        first.stop()
        second = coordinator_class(tmp_path / "state", listen=f"127.0.0.1:{port}")
        second.start()
        try:
            read += list(batches)
        finally:
            second.stop()
    indices = np.concatenate([t.column("index").to_numpy() for t in read])
    assert np.array_equal(indices, np.arange(rows))  # every row once, in order, across the restart
    assert np.array_equal(
        read[-1].column("embedding")[-1].values.to_numpy(), results["embedding"][-1].values.to_numpy()
    )
    resumed_at = [line for line in capsys.readouterr().out.splitlines() if "result_stream_resuming" in line]
    boundaries = np.cumsum([t.num_rows for t in read[:-1]])  # where a resumed stream could have started
    assert resumed_at and int(resumed_at[0].rsplit("next_index=", 1)[1].split()[0]) in boundaries
