"""The coordinator never imports torch or transformers (it runs on a head node without them), and the
coordinator and worker never import each other."""

from __future__ import annotations

import subprocess
import sys

import pytest


def imported_after(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize("module", ["distinfer.coordinator.main", "distinfer.client.cli"])
def test_no_torch_on_the_head_node_or_in_the_client(module):
    loaded = imported_after(module)
    assert "torch" not in loaded and "transformers" not in loaded


def test_coordinator_and_worker_do_not_import_each_other():
    assert not any(m.startswith("distinfer.worker") for m in imported_after("distinfer.coordinator.main"))
    assert not any(m.startswith("distinfer.coordinator") for m in imported_after("distinfer.worker.main"))


COORDINATOR_PARTS = ("uploads", "scheduler", "watchdog", "result_streams", "work_handout")


def coordinator_imports(module: str) -> set[str]:
    """The distinfer.coordinator modules a coordinator module imports (read from its source, not run)."""
    import ast
    from pathlib import Path

    import distinfer.coordinator

    source = Path(distinfer.coordinator.__path__[0], f"{module}.py").read_text()
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distinfer.coordinator."):
            names.add(node.module.rsplit(".", 1)[1])
    return names


@pytest.mark.parametrize("part", COORDINATOR_PARTS)
def test_the_coordinators_parts_stand_on_the_job_manager_and_not_on_each_other(part):
    imported = coordinator_imports(part)
    assert "jobs" in imported  # the one dependency: the manager
    assert not imported & set(COORDINATOR_PARTS), f"{part} imports another part: {imported & set(COORDINATOR_PARTS)}"


def test_the_job_manager_knows_none_of_the_parts_above_it():
    assert not coordinator_imports("jobs") & set(COORDINATOR_PARTS)


@pytest.mark.parametrize("module", ["jobs", "work_units", *COORDINATOR_PARTS])
def test_the_manager_and_the_parts_know_a_job_store_not_which_one(module):
    """They are given a JobStore (job_store.py): the SQLite store or the in-memory one, which server.py picks."""
    assert not coordinator_imports(module) & {"store", "memory_store"}
