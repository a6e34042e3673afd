"""The job state machine: every state has its transitions, ended jobs have none, and a change outside the table
is refused."""

from __future__ import annotations

import pytest

from distinfer.coordinator.job import TERMINAL, TRANSITIONS, UPLOADING, IllegalTransition, Job
from distinfer.v1 import jobs_pb2 as S


def test_every_state_has_its_transitions_and_ended_jobs_have_none():
    assert set(TRANSITIONS) == set(S.JobState.values())  # UPLOADING is JOB_STATE_UNSPECIFIED
    assert all(not TRANSITIONS[state] for state in TERMINAL)
    assert all(TRANSITIONS[state] for state in set(TRANSITIONS) - TERMINAL)


@pytest.mark.parametrize(
    "path",
    [
        [UPLOADING, S.QUEUED, S.SCHEDULED, S.RUNNING, S.SUCCEEDED],
        [UPLOADING, S.QUEUED, S.SCHEDULED, S.RUNNING, S.QUEUED, S.SCHEDULED, S.FAILED],
        [S.QUEUED, S.CANCELLED],
    ],
)
def test_a_job_moves_along_the_table_and_ends_with_its_time_and_code(path):
    job = Job(S.JobStatus(job_id="j", state=path[0]))
    for state in path[1:]:
        job.move_to(state, f"now {S.JobState.Name(state)}", error_code="ABORTED" if state == S.FAILED else "")
    assert job.status.state == path[-1] and job.status.message == f"now {S.JobState.Name(path[-1])}"
    assert job.status.finished_at > 0
    assert job.status.error_code == ("ABORTED" if path[-1] == S.FAILED else "")


@pytest.mark.parametrize(
    "start, to", [(UPLOADING, S.RUNNING), (S.QUEUED, S.RUNNING), (S.SUCCEEDED, S.QUEUED), (S.CANCELLED, S.FAILED)]
)
def test_a_change_outside_the_table_is_refused_and_leaves_the_job_as_it_was(start, to):
    job = Job(S.JobStatus(job_id="j", state=start, message="before"))
    with pytest.raises(IllegalTransition, match="no transition from"):
        job.move_to(to, "after")
    assert (job.status.state, job.status.message, job.status.finished_at) == (start, "before", 0)
