"""The checked-in generated code must match the .proto files: `make proto` after every change."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi", "_pb2_grpc.pyi")


def test_checked_in_generated_code_is_fresh(tmp_path):
    shutil.copytree(ROOT / "proto" / "distinfer", tmp_path / "distinfer", ignore=shutil.ignore_patterns("*.py*"))
    protos = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "distinfer" / "v1").glob("*.proto"))
    assert protos, "no .proto files found"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I.",
            "--python_out=.",
            "--grpc_python_out=.",
            "--mypy_out=.",
            "--mypy_grpc_out=.",
            *protos,
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        # protoc finds the mypy plugins on PATH: they sit beside this interpreter.
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"},
    )
    for proto in protos:
        stem = Path(proto).name.removesuffix(".proto")
        for suffix in GENERATED:
            fresh = (tmp_path / "distinfer" / "v1" / f"{stem}{suffix}").read_text()
            checked_in = (ROOT / "proto" / "distinfer" / "v1" / f"{stem}{suffix}").read_text()
            assert fresh == checked_in, f"proto/distinfer/v1/{stem}{suffix} is stale: run `make proto`"
