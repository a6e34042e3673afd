"""Which dataset errors fail a job at once, and which only its attempt (worker/parts.py)."""

from __future__ import annotations

import pytest

from distinfer.common.filesystems import DatasetError, StorageUnavailable, translated
from distinfer.worker.parts import DatasetUnreadable, permanent_errors


def test_an_error_every_attempt_would_meet_fails_the_job_and_one_that_may_pass_only_the_attempt():
    with pytest.raises(DatasetUnreadable, match="writing: .*does not exist"), permanent_errors("writing: "):
        with translated("s3://b/x"):
            raise FileNotFoundError("s3://b/x")
    with pytest.raises(StorageUnavailable, match="cannot use s3://b/x .*connection reset"), permanent_errors():
        with translated("s3://b/x"):
            raise OSError("When reading information for key 'x': AWS Error NETWORK_CONNECTION: connection reset")
    with pytest.raises(DatasetUnreadable, match="denied"), permanent_errors():
        with translated("s3://b/x"):
            raise OSError("AWS Error ACCESS_DENIED during GetObject operation")
    assert issubclass(StorageUnavailable, DatasetError)
