"""One coordinator per state folder: a second one would recover the same jobs, schedule them again on other
workers and overwrite the first one's records."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class StateDirInUse(RuntimeError):
    pass


def lock_state_dir(state_dir: Path):
    """Hold state_dir/lock until the returned file is closed (or the process ends, however it ends: the kernel
    drops the lock, so a killed coordinator leaves nothing to clean up)."""
    path = Path(state_dir) / "lock"
    lock = open(path, "a+")  # noqa: SIM115 - held for the coordinator's lifetime
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise StateDirInUse(
            f"another coordinator ({holder}) is using the state folder {state_dir}: stop it first, or give this "
            "one its own --state-dir"
        ) from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {os.uname().nodename}")
    lock.flush()
    return lock
