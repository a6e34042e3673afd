"""Every option as a flag, a DISTINFER_* variable and a TOML setting, with flags winning."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from distinfer.client.arguments import build_parser
from distinfer.common.config import ConfiguredParser, Settings
from distinfer.coordinator.main import parse_args as coordinator_args
from distinfer.worker.main import parse_args as worker_args


def test_environment_and_file_fill_defaults_and_flags_win(tmp_path, monkeypatch):
    config = tmp_path / "distinfer.toml"
    config.write_text('[coordinator]\nheartbeat-timeout = 9.0\nrendezvous_timeout = 30\nlisten = "0.0.0.0:7000"\n')
    monkeypatch.setenv("DISTINFER_CONFIG", str(config))
    monkeypatch.setenv("DISTINFER_HEARTBEAT_TIMEOUT", "7")

    args = coordinator_args([])
    assert args.heartbeat_timeout == 7.0  # the variable beats the file
    assert args.rendezvous_timeout == 30  # the file beats the default (either key spelling)
    assert args.listen == "0.0.0.0:7000"
    assert coordinator_args(["--heartbeat-timeout", "4"]).heartbeat_timeout == 4.0  # the flag beats both


def test_worker_booleans_lists_and_required_options_from_the_environment(monkeypatch):
    monkeypatch.setenv("DISTINFER_COORDINATOR", "head:50051")
    monkeypatch.setenv("DISTINFER_ALLOW_PICKLE_WEIGHTS", "true")
    monkeypatch.setenv("DISTINFER_MODEL_ROOT", os.pathsep.join(["/models", "/scratch/models"]))
    monkeypatch.setenv("DISTINFER_PORTS", "30000-30010")
    monkeypatch.setenv("DISTINFER_JOIN_TOKEN", "join-secret")
    args = worker_args([])
    assert args.coordinator == "head:50051"  # a required flag, satisfied by the environment
    assert args.allow_pickle_weights is True
    assert args.model_root == ["/models", "/scratch/models"]
    assert args.ports == (30000, 30010)
    assert args.token == "join-secret"


def test_a_repeatable_flag_replaces_its_values_from_the_environment_or_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTINFER_STATE", "running")
    monkeypatch.setenv("DISTINFER_COORDINATOR", "head:50051")
    parse = build_parser(["jobs"]).parse_args
    assert parse(["jobs"]).state == ["RUNNING"]
    assert parse(["jobs", "--state", "failed", "--state", "queued"]).state == ["FAILED", "QUEUED"]
    config = tmp_path / "c.toml"
    config.write_text('[worker]\nmodel-root = ["/models"]\n')
    args = worker_args(["--config", str(config), "--coordinator", "h:1", "--model-root", "/mine"])
    assert args.model_root == ["/mine"]


def test_a_repeatable_flags_values_from_the_environment_are_checked(monkeypatch, capsys):
    monkeypatch.setenv("DISTINFER_STATE", "running" + os.pathsep + "done")
    with pytest.raises(SystemExit):
        build_parser(["jobs"])
    assert "DISTINFER_STATE: 'DONE' is not one of QUEUED" in capsys.readouterr().err


def test_client_commands_read_the_client_table(tmp_path, monkeypatch):
    config = tmp_path / "c.toml"
    config.write_text('[client]\ncoordinator = "head:50051"\ntoken = "from-file"\n')
    args = build_parser(["jobs", "--config", str(config)]).parse_args(["jobs", "--config", str(config)])
    assert args.coordinator == "head:50051" and args.token == "from-file"


def test_bad_settings_are_refused_with_where_they_came_from(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DISTINFER_HEARTBEAT_TIMEOUT", "soon")
    with pytest.raises(SystemExit):
        coordinator_args([])
    assert "DISTINFER_HEARTBEAT_TIMEOUT" in capsys.readouterr().err
    monkeypatch.delenv("DISTINFER_HEARTBEAT_TIMEOUT")

    config = tmp_path / "bad.toml"
    config.write_text("[coordinator]\nheartbeat-timout = 3\n")
    with pytest.raises(SystemExit):
        coordinator_args(["--config", str(config)])
    assert "unknown settings in [coordinator]: heartbeat-timout" in capsys.readouterr().err

    config.write_text("[coordinator\n")
    with pytest.raises(SystemExit, match="is not valid TOML"):
        coordinator_args(["--config", str(config)])


def test_help_names_each_variable(capsys):
    with pytest.raises(SystemExit):
        worker_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "[env DISTINFER_MODEL_ROOT]" in text and "[env DISTINFER_JOIN_TOKEN]" in text


def test_flags_in_a_group_and_in_every_subcommand_read_the_environment(monkeypatch):
    monkeypatch.setenv("DISTINFER_DEPTH", "3")
    monkeypatch.setenv("DISTINFER_WIDTH", "4")
    parser = ConfiguredParser(prog="prog", settings=Settings([], "client", "prog"))
    parser.add_argument_group("sizes").add_argument("--depth", type=int, default=0)
    parser.add_subparsers(dest="command").add_parser("go").add_argument("--width", type=int, default=0)
    args = parser.parse_args(["go"])
    assert (args.depth, args.width) == (3, 4)


def test_no_program_reaches_into_argparse_internals():
    """Options are configured through what add_argument is given (common/config.py), never through argparse's
    private actions, which change between Python versions."""
    root = Path(__file__).resolve().parents[3]
    offending = [
        f"{path.relative_to(root)}: {needle}"
        for package in ("client", "common", "coordinator", "worker")
        for path in (root / package).rglob("*.py")
        for needle in ("argparse._", "._actions", ".__class__ =")
        if needle in path.read_text()
    ]
    assert offending == []
