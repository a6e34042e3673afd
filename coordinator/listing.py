"""ListJobs pages: newest job first, cut at a token that names the last job shown.

The token holds that job's (created_at, job_id), not an offset, so jobs submitted or deleted between two
pages neither repeat nor skip one: the next page starts after that place in the order, wherever it now is.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable

from distinfer.common.channels import STREAM_MESSAGE_BYTES
from distinfer.common.errors import InvalidArgument
from distinfer.common.tasks import JOB_STATES
from distinfer.coordinator.job import Job
from distinfer.v1 import jobs_pb2

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# A job of many ranks and attempts has a status of tens of KB: a page also ends at this size, far below what
# gRPC takes in one message.
MAX_PAGE_BYTES = STREAM_MESSAGE_BYTES


def _key(job: Job) -> tuple[float, str]:
    return job.created_at, job.job_id


def _token(job: Job) -> str:
    return base64.urlsafe_b64encode(json.dumps(_key(job)).encode()).decode()


def _after(token: str) -> tuple[float, str]:
    try:
        created_at, job_id = json.loads(base64.urlsafe_b64decode(token.encode()))
        return float(created_at), str(job_id)
    except (ValueError, TypeError):
        raise InvalidArgument(
            "page_token is not one this coordinator gave: pass a response's next_page_token as it came, or "
            "none for the first page"
        ) from None


def list_page(jobs: Iterable[Job], request: jobs_pb2.ListJobsRequest) -> jobs_pb2.ListJobsResponse:
    size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    states = set(request.states)
    if unknown := states - {jobs_pb2.JobState.Value(name) for name in JOB_STATES}:
        raise InvalidArgument(f"no job state {sorted(unknown)[0]}: states are {', '.join(JOB_STATES)}")
    chosen = [job for job in jobs if not states or job.state in states]
    if request.page_token:
        after = _after(request.page_token)
        chosen = [job for job in chosen if _key(job) < after]
    chosen.sort(key=_key, reverse=True)
    page, page_bytes = [], 0
    for job in chosen[:size]:
        status = job.to_status()
        page_bytes += status.ByteSize()
        if page and page_bytes > MAX_PAGE_BYTES:
            break
        page.append(status)
    more = len(page) < len(chosen)
    return jobs_pb2.ListJobsResponse(jobs=page, next_page_token=_token(chosen[len(page) - 1]) if more else "")
