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
