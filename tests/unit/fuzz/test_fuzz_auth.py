"""Fuzz the bearer-token checks: any header, on any RPC of a coordinator that requires tokens."""

from __future__ import annotations

from fuzz_harness import (
    ALLOWED,
    AUTH_CODES,
    END,
    FUZZ,
    GOOD_SPEC,
    PATHS,
    TIMEOUT_S,
    Stubs,
    assert_still_serves,
    check,
    outcome,
    rows_message,
)
from hypothesis import given
from hypothesis import strategies as st

from distinfer.common.channels import open_channel
from distinfer.v1 import jobs_pb2, workers_pb2

# --- bearer tokens ----------------------------------------------------------------------------------------

CLIENT_TOKEN, JOIN_TOKEN = "client-fuzz-token", "join-fuzz-token"


def minimal_call(stubs: Stubs, rpc: str, metadata):
    """Invoke `rpc` with a harmless request; returns the call to make."""
    kw = {"timeout": TIMEOUT_S, "metadata": metadata}
    jobs, workers = stubs.jobs, stubs.workers
    return {
        "SubmitJob": lambda: jobs.SubmitJob(
            iter([jobs_pb2.SubmitJobRequest(spec=GOOD_SPEC), rows_message(["a"]), END]), **kw
        ),
        "StreamResults": lambda: list(jobs.StreamResults(jobs_pb2.StreamResultsRequest(job_id="j-none"), **kw)),
        "GetJob": lambda: jobs.GetJob(jobs_pb2.GetJobRequest(job_id="j-none"), **kw),
        "WatchJob": lambda: list(jobs.WatchJob(jobs_pb2.GetJobRequest(job_id="j-none"), **kw)),
        "ListJobs": lambda: jobs.ListJobs(jobs_pb2.ListJobsRequest(), **kw),
        "CancelJob": lambda: jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id="j-none"), **kw),
        "ListWorkers": lambda: jobs.ListWorkers(jobs_pb2.ListWorkersRequest(), **kw),
        "RegisterWorker": lambda: workers.RegisterWorker(workers_pb2.RegisterWorkerRequest(), **kw),
        "Connect": lambda: list(workers.Connect(iter([workers_pb2.WorkerMessage(worker_id="w-none")]), **kw)),
        "FetchShard": lambda: list(workers.FetchShard(workers_pb2.FetchShardRequest(world_size=1), **kw)),
        "FetchWork": lambda: workers.FetchWork(workers_pb2.FetchWorkRequest(job_id="j-none"), **kw),
        "ReportResults": lambda: workers.ReportResults(iter([workers_pb2.ReportResultsRequest(job_id="j-none")]), **kw),
    }[rpc]


def test_fuzz_authorization_headers(tmp_path, coordinator_class):
    """Random authorization headers on every RPC of a coordinator that wants tokens."""
    server = coordinator_class(tmp_path / "state", client_token=CLIENT_TOKEN, join_token=JOIN_TOKEN)
    server.address = server.start()
    # Header values must be printable ASCII, or grpcio refuses to send them.
    printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
    headers = st.one_of(
        st.none(),
        printable,
        st.sampled_from(["Bearer", "Bearer ", "bearer", "Basic abc", CLIENT_TOKEN, JOIN_TOKEN]),
        st.sampled_from(["Bearer ", "bearer ", "BEARER ", "Token "]).flatmap(
            lambda scheme: st.one_of(st.sampled_from([CLIENT_TOKEN, JOIN_TOKEN]), printable).map(lambda t: scheme + t)
        ),
    )
    try:
        with open_channel(server.address) as channel:
            stubs = Stubs(channel)

            @FUZZ
            @given(rpc=st.sampled_from(sorted(PATHS)), header=headers)
            def run(rpc, header):
                metadata = () if header is None else (("authorization", header),)
                code, details, _ = outcome(minimal_call(stubs, rpc, metadata))
                wanted = CLIENT_TOKEN if PATHS[rpc].startswith("/distinfer.v1.Jobs/") else JOIN_TOKEN

                def passes(value: str) -> bool:
                    scheme, _, token = value.partition(" ")
                    return scheme.lower() == "bearer" and token == wanted

                if passes(header or ""):
                    allowed = ALLOWED[rpc]
                elif passes((header or "").strip()):  # the transport may trim the value's surrounding whitespace
                    allowed = ALLOWED[rpc] | AUTH_CODES
                else:
                    allowed = AUTH_CODES
                check(rpc, code, details, header, allowed=allowed, kind=" (token)")

            run()
        assert_still_serves(server, metadata=(("authorization", f"Bearer {CLIENT_TOKEN}"),))
    finally:
        server.stop()
