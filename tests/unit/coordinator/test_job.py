"""The job record and its state machine: every state has its transitions, ended jobs have none, a change outside
the table is refused, and the record goes to the public JobStatus and back whole."""

from __future__ import annotations

import dataclasses

import pytest

from distinfer.common.tasks import ENDED_STATES
from distinfer.coordinator.job import TRANSITIONS, IllegalTransition, Job, JobState
from distinfer.v1 import jobs_pb2 as S

UPLOADING, QUEUED, SCHEDULED, RUNNING = JobState.UPLOADING, JobState.QUEUED, JobState.SCHEDULED, JobState.RUNNING
SUCCEEDED, FAILED, CANCELLED = JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED


def a_job(**fields) -> Job:
    return Job(job_id="j", spec=S.JobSpec(model="m"), created_at=1.0, **fields)


def test_every_state_has_its_transitions_and_ended_jobs_have_none():
    assert set(TRANSITIONS) == set(JobState)
    assert {state for state in JobState if state.ended} == ENDED_STATES
    assert all(not TRANSITIONS[state] for state in JobState if state.ended)
    assert all(TRANSITIONS[state] for state in JobState if not state.ended)


def test_the_public_states_are_the_protos_and_uploading_is_never_one_a_user_sees():
    assert {state.value for state in JobState} - {UPLOADING.value} == set(S.JobState.values()) - {0}
    assert a_job().to_status().state == S.JOB_STATE_UNSPECIFIED


@pytest.mark.parametrize(
    "path",
    [
        [UPLOADING, QUEUED, SCHEDULED, RUNNING, SUCCEEDED],
        [UPLOADING, QUEUED, SCHEDULED, RUNNING, QUEUED, SCHEDULED, FAILED],
        [QUEUED, CANCELLED],
    ],
)
def test_a_job_moves_along_the_table_and_ends_with_its_time_and_code(path):
    job = a_job(state=path[0])
    for state in path[1:]:
        job.move_to(state, f"now {state.name}", error_code="ABORTED" if state == FAILED else "")
    assert job.state == path[-1] and job.message == f"now {path[-1].name}"
    assert job.finished_at > 0
    assert job.error_code == ("ABORTED" if path[-1] == FAILED else "")


@pytest.mark.parametrize(
    "start, to", [(UPLOADING, RUNNING), (QUEUED, RUNNING), (SUCCEEDED, QUEUED), (CANCELLED, FAILED)]
)
def test_a_change_outside_the_table_is_refused_and_leaves_the_job_as_it_was(start, to):
    job = a_job(state=start, message="before")
    with pytest.raises(IllegalTransition, match=f"no transition from {start.name} to {to.name}"):
        job.move_to(to, "after")
    assert (job.state, job.message, job.finished_at) == (start, "before", 0)


def test_the_record_goes_to_the_public_status_and_back_whole():
    job = a_job(state=RUNNING, message="running", num_rows=10, rows_done=4, rows_arriving=True, splits=3)
    job.splits_done, job.started_at, job.time_to_first_result_s, job.error_code = 1, 2.0, 0.5, "X"
    job.timings.compute_s = 7.0
    job.attempts.append(S.Attempt(number=1, ranks=[S.RankInfo(rank=0, worker_id="w")]))
    status = job.to_status()
    assert status.state == S.RUNNING and status.uploading and status.attempts[0].ranks[0].worker_id == "w"
    back = Job.from_status(status)
    record = [
        f.name for f in dataclasses.fields(Job) if f.name not in ("attempt", "changed", "readers", "result_schema")
    ]
    assert {name: getattr(back, name) for name in record} == {name: getattr(job, name) for name in record}


def test_a_status_is_a_copy_that_later_changes_leave_as_it_was():
    """A watch compares the status it sent with the job's next one: a later change must leave the first as it was."""
    job = a_job(state=QUEUED)
    job.attempts.append(S.Attempt(number=1))
    status = job.to_status()
    job.move_to(SCHEDULED, "placed")
    job.attempts[0].end_reason = "lost"
    job.timings.queued_s = 3.0
    assert (status.state, status.message, status.attempts[0].end_reason, status.timings.queued_s) == (
        S.QUEUED,
        "",
        "",
        0,
    )
