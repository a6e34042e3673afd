"""Fuzz the Workers service with structurally valid messages holding random values, alone and around a
live attempt."""

from __future__ import annotations

import time

from fuzz_harness import (
    ALLOWED,
    FUZZ,
    FUZZ_LIVE,
    SEEN,
    TERMINAL,
    TIMEOUT_S,
    WAITING_TIMEOUT_S,
    C,
    ControlStream,
    LiveAttempt,
    Stubs,
    check,
    connect_worker,
    outcome,
    queued_and_cancelled_jobs,
)
from fuzz_strategies import (
    arrow_results,
    choice,
    echoed_strings,
    job_ids_around,
    register_requests,
    slot_events,
    small,
    strings,
    uint32s,
    uint64s,
    worker_messages,
)
from hypothesis import example, given
from hypothesis import strategies as st

from distinfer.common.result_columns import from_ipc, from_results, to_ipc
from distinfer.v1 import jobs_pb2, workers_pb2


def rows_in(arrow: bytes) -> int:
    try:
        return from_ipc(arrow).num_rows
    except Exception:  # noqa: BLE001 - bytes that are not an Arrow stream carry no rows
        return 0


# --- (a) structurally valid messages, random values: Workers ----------------------------------------------


def test_fuzz_register_worker(fuzzed, stubs):
    @FUZZ
    @given(request=register_requests)
    @example(request=workers_pb2.RegisterWorkerRequest(advertise_host="h", slots=[workers_pb2.Slot()], port_lo=1))
    def run(request):
        code, details, response = outcome(lambda: stubs.workers.RegisterWorker(request, timeout=TIMEOUT_S))
        valid = bool(request.slots) and bool(request.advertise_host) and 0 < request.port_lo <= request.port_hi < 65536
        check("RegisterWorker", code, details, request, allowed={C.OK} if valid else {C.INVALID_ARGUMENT})
        listed = stubs.worker_ids()  # ListWorkers serializes whatever was registered
        SEEN["ListWorkers"]["OK"] += 1
        if code == C.OK:
            assert response.worker_id in listed and response.heartbeat_interval_s > 0

    run()


def test_fuzz_connect(fuzzed, stubs):
    """Random control-stream messages: unknown workers are NOT_FOUND; a registered worker's stream ends when
    its requests end (the worker is then gone), and nothing is assigned with no job queued."""
    REGISTERED = "<a freshly registered worker>"

    @FUZZ
    @given(
        first_id=choice((2, st.just(REGISTERED)), (1, strings)),
        messages=st.lists(worker_messages(choice((3, st.just(REGISTERED)), (1, strings))), max_size=5),
    )
    def run(first_id, messages):
        worker_id = stubs.register() if first_id == REGISTERED else first_id
        for message in messages:
            if message.worker_id == REGISTERED:
                message.worker_id = worker_id
        if messages:
            messages[0].worker_id = worker_id
        code, details, received = outcome(lambda: list(stubs.workers.Connect(iter(messages), timeout=TIMEOUT_S)))
        connected = bool(messages) and first_id == REGISTERED
        check("Connect", code, details, messages, allowed={C.OK} if connected else {C.NOT_FOUND})
        if connected:
            assert received == []  # nothing is queued, so nothing is assigned
            stubs.wait_worker_gone(worker_id)

    run()


def test_fuzz_fetch_shard(fuzzed, stubs):
    queued, cancelled = queued_and_cancelled_jobs(stubs)
    known = set(queued + cancelled)

    @FUZZ
    @given(
        job_id=job_ids_around(queued + cancelled),
        attempt=st.one_of(small, uint32s),
        rank=choice((3, st.integers(0, 3)), (1, uint32s)),
        world_size=choice((3, st.integers(1, 4)), (1, st.just(0)), (1, uint32s)),
    )
    def run(job_id, attempt, rank, world_size):
        request = workers_pb2.FetchShardRequest(job_id=job_id, attempt=attempt, rank=rank, world_size=world_size)
        code, details, _ = outcome(lambda: list(stubs.workers.FetchShard(request, timeout=TIMEOUT_S)))
        if world_size < 1 or rank >= world_size:
            expected = {C.INVALID_ARGUMENT}
        else:  # no attempt runs here: no worker is connected
            expected = {C.FAILED_PRECONDITION} if job_id in known else {C.NOT_FOUND}
        check("FetchShard", code, details, request, allowed=expected)

    run()


def test_fuzz_report_results(fuzzed, stubs):
    queued, cancelled = queued_and_cancelled_jobs(stubs)
    known = set(queued + cancelled)
    requests = st.builds(
        workers_pb2.ReportResultsRequest,
        job_id=job_ids_around(queued + cancelled),
        attempt=st.one_of(small, uint32s),
        arrow=arrow_results(),
    )

    @FUZZ
    @given(messages=st.lists(requests, max_size=4))
    def run(messages):
        code, details, response = outcome(lambda: stubs.workers.ReportResults(iter(messages), timeout=TIMEOUT_S))
        if not messages:
            expected = {C.OK}
        elif not messages[0].job_id:
            expected = {C.NOT_FOUND, C.INVALID_ARGUMENT}
        else:  # no attempt runs here: no worker is connected
            expected = {C.FAILED_PRECONDITION} if messages[0].job_id in known else {C.NOT_FOUND}
        check("ReportResults", code, details, messages, allowed=expected)
        if code == C.OK:
            assert response.committed == 0

    run()


# --- the worker protocol around a live attempt -------------------------------------------------------------


def test_fuzz_worker_protocol_around_a_live_attempt(fuzzed, stubs):
    """A registered, connected worker holds a live attempt of an echo job; it then sends random slot events and
    heartbeats, fetches random shards, reports random results and reconnects, while a client reads and cancels.
    Statuses stay specific, rows_done never passes num_rows, the job ends, and its result stream ends with it."""

    @FUZZ_LIVE
    @given(data=st.data(), slot_count=st.integers(1, 2), rows=st.integers(1, 6), max_workers=st.integers(0, 2))
    def run(data, slot_count, rows, max_workers):
        worker_id, stream = connect_worker(stubs, slot_count)
        job_id = ""
        try:
            spec = jobs_pb2.JobSpec(task="echo", max_workers=max_workers)
            job_id = stubs.submit(spec, [f"row {i}" for i in range(rows)]).job_id
            live = LiveAttempt.formed(stream, job_id)
            for _ in range(data.draw(st.integers(0, 8), label="moves")):
                live.drain()
                act(data, stubs, stream, live, worker_id, rows)
            if data.draw(st.booleans(), label="then finish the attempt properly"):
                live.drain()
                complete(stubs, stream, live, worker_id, rows)
        finally:
            if job_id:
                request = jobs_pb2.CancelJobRequest(job_id=job_id)
                code, details, _ = outcome(lambda: stubs.jobs.CancelJob(request, timeout=TIMEOUT_S))
                check("CancelJob", code, details, request, allowed={C.OK, C.FAILED_PRECONDITION}, kind=" (live)")
            code, details = stream.close()
        check("Connect", code, details, "the fuzzed worker's control stream", allowed={C.OK}, kind=" (live)")
        stubs.wait_worker_gone(worker_id)
        status = stubs.status(job_id)
        SEEN["job's end (live)"][jobs_pb2.JobState.Name(status.state)] += 1
        assert status.state in TERMINAL and status.rows_done <= status.num_rows == rows, status
        # An ended job's result stream ends too: with every row, in order, when every row was committed (as
        # it is for a job that succeeded, and can be for one cancelled or failed after its last commit).
        request = jobs_pb2.StreamResultsRequest(job_id=job_id)
        code, details, batches = outcome(lambda: list(stubs.jobs.StreamResults(request, timeout=TIMEOUT_S)))
        if status.state == jobs_pb2.SUCCEEDED or status.rows_done == rows:
            check("StreamResults", code, details, request, allowed={C.OK}, kind=" (live)")
            assert [r.index for b in batches for r in b.results] == list(range(rows))
        else:
            allowed = ALLOWED["StreamResults"] - {C.OK, C.DEADLINE_EXCEEDED}
            check("StreamResults", code, details, request, allowed=allowed, kind=" (live)")

    run()


def complete(stubs: Stubs, stream: ControlStream, live: LiveAttempt, worker_id: str, rows: int) -> None:
    """What a healthy group does: rank 0 commits every row, then every rank says FINISHED."""
    done = [jobs_pb2.Result(index=i, echo=jobs_pb2.Echo(chars=5)) for i in range(rows)]
    report = workers_pb2.ReportResultsRequest(job_id=live.job_id, attempt=live.number, arrow=to_ipc(from_results(done)))
    code, details, _ = outcome(lambda: stubs.workers.ReportResults(iter([report]), timeout=TIMEOUT_S))
    check("ReportResults", code, details, report, kind=" (live)")
    for rank in range(live.world_size):
        event = workers_pb2.SlotEvent(
            job_id=live.job_id, attempt=live.number, rank=rank, kind=workers_pb2.SlotEvent.FINISHED
        )
        stream.send(workers_pb2.WorkerMessage(worker_id=worker_id, event=event))
    deadline = time.monotonic() + 0.5  # the events are handled asynchronously: give them a moment
    while stubs.status(live.job_id).state not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.005)


def act(data, stubs: Stubs, stream: ControlStream, live: LiveAttempt, worker_id: str, rows: int) -> None:
    """One random move of the worker (or of a client) against the live attempt."""
    job_ids = choice((6, st.just(live.job_id)), (1, echoed_strings))
    attempts = choice((6, st.just(live.number)), (1, st.just(live.number + 1)), (1, uint32s))
    ranks = choice((6, st.integers(0, max(live.world_size - 1, 0))), (1, st.integers(0, 3)), (1, uint32s))
    kind = data.draw(
        choice(
            (4, st.just("event")),
            (1, st.just("heartbeat")),
            (2, st.just("fetch")),
            (3, st.just("report")),
            (1, st.just("complete")),
            (1, st.just("stream")),
            (1, st.just("get")),
            (1, st.just("reconnect")),
        ),
        label="action",
    )
    SEEN["moves (live)"][kind] += 1
    if kind == "event":
        event = data.draw(slot_events(job_ids, attempts, ranks))
        stream.send(workers_pb2.WorkerMessage(worker_id=worker_id, event=event))
        time.sleep(0.005)  # let the coordinator act on it before the next move
    elif kind == "heartbeat":
        healthy = data.draw(st.lists(st.one_of(small, uint32s), max_size=3))
        stream.send(
            workers_pb2.WorkerMessage(worker_id=worker_id, heartbeat=workers_pb2.Heartbeat(healthy_slots=healthy))
        )
    elif kind == "fetch":
        request = workers_pb2.FetchShardRequest(
            job_id=data.draw(job_ids),
            attempt=data.draw(attempts),
            rank=data.draw(ranks),
            world_size=data.draw(choice((4, st.just(live.world_size)), (1, small), (1, uint32s))),
        )
        code, details, batches = outcome(lambda: list(stubs.workers.FetchShard(request, timeout=TIMEOUT_S)))
        check("FetchShard", code, details, request, kind=" (live)")
        if code == C.OK:
            indices = [i for b in batches for i in b.indices]
            assert all(len(b.indices) == len(b.texts) for b in batches)
            assert indices == sorted(set(indices)) and all(i < rows for i in indices), indices
    elif kind == "report":
        indices = st.one_of(st.integers(0, rows - 1), st.integers(0, rows - 1), st.just(rows), uint64s)
        requests = st.builds(
            workers_pb2.ReportResultsRequest,
            job_id=job_ids,
            attempt=attempts,
            arrow=arrow_results(indices),
        )
        messages = data.draw(st.lists(requests, max_size=3))
        code, details, response = outcome(lambda: stubs.workers.ReportResults(iter(messages), timeout=TIMEOUT_S))
        check("ReportResults", code, details, messages, kind=" (live)")
        if code == C.OK:
            assert response.committed <= sum(rows_in(m.arrow) for m in messages)
    elif kind == "complete":
        complete(stubs, stream, live, worker_id, rows)
    elif kind == "stream":
        request = jobs_pb2.StreamResultsRequest(job_id=data.draw(job_ids), start_index=data.draw(st.integers(0, rows)))
        code, details, _ = outcome(lambda: list(stubs.jobs.StreamResults(request, timeout=WAITING_TIMEOUT_S)))
        check("StreamResults", code, details, request, kind=" (live)")
    elif kind == "get":
        status = stubs.status(live.job_id)
        SEEN["GetJob (live)"]["OK"] += 1
        assert status.rows_done <= status.num_rows == rows, status
    else:
        # The same worker opens a second control stream (a reconnect racing the first) with one message. An
        # event for a rank outside the group as that first message is checked by a test below.
        first = workers_pb2.WorkerMessage(worker_id=worker_id)
        if data.draw(st.booleans()):
            first.heartbeat.healthy_slots.extend(data.draw(st.lists(small, max_size=2)))
        else:
            in_group = st.integers(0, max(live.world_size - 1, 0))
            first.event.CopyFrom(data.draw(slot_events(job_ids, attempts, in_group)))
        code, details, _ = outcome(lambda: list(stubs.workers.Connect(iter([first]), timeout=TIMEOUT_S)))
        check("Connect", code, details, first, kind=" (live, second stream)")
