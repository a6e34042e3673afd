"""Every option of every program as a flag, an environment variable and a TOML setting; flags win.

Precedence: command line > DISTINFER_<FLAG> environment variable > the TOML file's section for the program
(--config FILE or $DISTINFER_CONFIG) > the built-in default. The variable's name comes from the long flag:
--heartbeat-timeout is DISTINFER_HEARTBEAT_TIMEOUT, and the TOML key is heartbeat-timeout (or _timeout).
"""

from __future__ import annotations

import argparse
import os
import tomllib
from pathlib import Path

TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


def env_name(action: argparse.Action) -> str | None:
    longs = [o for o in action.option_strings if o.startswith("--")]
    return f"DISTINFER_{longs[0][2:].upper().replace('-', '_')}" if longs else None


def apply_config(parsers: list[argparse.ArgumentParser], argv: list[str] | None, section: str) -> None:
    """Set the parsers' defaults from the environment and the TOML file's table, and say so in --help.

    Several parsers (a CLI's subcommands) may share one table: a key is unknown only if none of them has it.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=os.environ.get("DISTINFER_CONFIG"))
    known, _ = pre.parse_known_args(argv)
    program = parsers[0].prog.split()[0]  # "distinfer", not the first of its subcommands
    settings = _read_toml(known.config, section, program) if known.config else {}
    used: set[str] = set()
    for parser in parsers:
        used |= _apply(parser, settings, section, str(known.config))
    if unknown := sorted(set(settings) - used):
        _refuse(parsers[0], f"{known.config}: unknown settings in [{section}]: {', '.join(unknown)}")


def _apply(parser: argparse.ArgumentParser, settings: dict, section: str, source: str) -> set[str]:
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"TOML file whose [{section}] table sets defaults (env DISTINFER_CONFIG)",
    )
    used = set()
    for action in parser._actions:
        name = env_name(action)
        if name is None or action.dest in ("help", "config"):
            continue
        if action.help and action.help != argparse.SUPPRESS:
            action.help += f" [env {name}]"
        flag = action.option_strings[-1][2:]
        for key in (flag, flag.replace("-", "_")):
            if key in settings:
                used.add(key)
                _set_default(parser, action, settings[key], f"{source} [{section}] {key}")
        if name in os.environ:
            _set_default(parser, action, os.environ[name], name)
    return used


def _set_default(parser, action: argparse.Action, value, source: str) -> None:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if isinstance(value, str):
            if value.lower() not in TRUE | FALSE:
                _refuse(parser, f"{source}: expected true or false, not {value!r}")
            value = value.lower() in TRUE
        value = value if isinstance(action, argparse._StoreTrueAction) else not value
    elif isinstance(action, argparse._AppendAction):
        value = value.split(os.pathsep) if isinstance(value, str) else list(value)
        value = [action.type(v) if action.type else v for v in value if v]
        if action.choices is not None and (wrong := [v for v in value if v not in action.choices]):
            _refuse(parser, f"{source}: {wrong[0]!r} is not one of {', '.join(map(str, action.choices))}")
        action.__class__ = _AppendOverDefault
    elif isinstance(value, str) and action.type is not None:
        try:
            value = action.type(value)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            _refuse(parser, f"{source}: {exc}")
    if action.choices is not None and not isinstance(value, list) and value not in action.choices:
        _refuse(parser, f"{source}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    action.default = value
    action.required = False  # given by the environment or the file


def _refuse(parser: argparse.ArgumentParser, message: str) -> None:
    """A bad setting from the environment or the file: its source says where it is, so no usage text (which
    would be a subcommand's that the user may not have run)."""
    parser.exit(2, f"{parser.prog.split()[0]}: error: {message}\n")


class _AppendOverDefault(argparse._AppendAction):
    """A repeatable flag whose default came from the environment or the file: given on the command line, its
    values replace that default (flags win) instead of adding to it."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is self.default:
            setattr(namespace, self.dest, [])
        super().__call__(parser, namespace, values, option_string)


def _read_toml(path: Path, section: str, program: str) -> dict:
    try:
        document = tomllib.loads(path.read_text())
    except OSError as exc:
        raise SystemExit(f"{program}: cannot read the config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SystemExit(f"{program}: {path} is not valid TOML: {exc}") from None
    table = document.get(section, {})
    if not isinstance(table, dict):
        raise SystemExit(f"{program}: {path}: [{section}] must be a table")
    return dict(table)
