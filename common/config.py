"""Every option of every program as a flag, an environment variable and a TOML setting, declared once (as the
flag); flags win.

Precedence: command line > DISTINFER_<FLAG> environment variable > the TOML file's section for the program
(--config FILE or $DISTINFER_CONFIG) > the built-in default. The variable's name comes from the long flag:
--heartbeat-timeout is DISTINFER_HEARTBEAT_TIMEOUT, and the TOML key is heartbeat-timeout (or _timeout).
A program builds its parser as a `ConfiguredParser`, which gives each flag, as it is added, the default the
environment or the file sets (only argparse's public API: what add_argument is given, never its actions).
"""

from __future__ import annotations

import argparse
import functools
import os
import tomllib
from pathlib import Path

TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


class Settings:
    """The environment and the config file's [section] table, read once for all of a program's parsers."""

    def __init__(self, argv: list[str] | None, section: str, program: str):
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config", type=Path, default=os.environ.get("DISTINFER_CONFIG"))
        self.file = pre.parse_known_args(argv)[0].config
        self.section, self.program = section, program
        self.table = _read_toml(self.file, section, program) if self.file else {}
        self.used: set[str] = set()  # the table's keys some flag took

    def flag_arguments(self, parser: argparse.ArgumentParser, flags: tuple[str, ...], kwargs: dict) -> dict:
        """add_argument's keywords for `flags`, with the default the environment or the file gives (which
        then also satisfies a required flag), and --help naming the variable."""
        longs = [f for f in flags if f.startswith("--")]
        if not longs or longs[0] in ("--help", "--config"):
            return kwargs
        key = longs[0][2:]
        name = f"DISTINFER_{key.upper().replace('-', '_')}"
        kwargs = dict(kwargs)
        if kwargs.get("help") and kwargs["help"] != argparse.SUPPRESS:
            kwargs["help"] += f" [env {name}]"
        found = [(k, self.table[k]) for k in (key, key.replace("-", "_")) if k in self.table]
        self.used.update(k for k, _ in found)
        if name in os.environ:
            value, source = os.environ[name], name
        elif found:
            value, source = found[-1][1], f"{self.file} [{self.section}] {found[-1][0]}"
        else:
            return kwargs
        kwargs["default"] = self._typed(parser, kwargs, value, source)
        kwargs["required"] = False
        if kwargs.get("action") == "append":
            kwargs["action"] = _AppendOverDefault
        return kwargs

    def _typed(self, parser, kwargs: dict, value, source: str):
        action, convert, choices = kwargs.get("action"), kwargs.get("type"), kwargs.get("choices")
        if action in ("store_true", "store_false", "store_const"):
            if isinstance(value, str):
                if value.lower() not in TRUE | FALSE:
                    _refuse(parser, f"{source}: expected true or false, not {value!r}")
                value = value.lower() in TRUE
            if action == "store_const":  # set: the flag given
                return kwargs.get("const") if value else kwargs.get("default")
            return value if action == "store_true" else not value
        values = value if action == "append" else [value]
        if action == "append" and isinstance(value, str):
            values = [v for v in value.split(os.pathsep) if v]
        typed = []
        for v in values:
            if isinstance(v, str) and convert is not None:
                try:
                    v = convert(v)
                except (ValueError, argparse.ArgumentTypeError) as exc:
                    _refuse(parser, f"{source}: {exc}")
            if choices is not None and v not in choices:
                _refuse(parser, f"{source}: {v!r} is not one of {', '.join(map(str, choices))}")
            typed.append(v)
        return typed if action == "append" else typed[0]

    def refuse_unknown(self, parser: argparse.ArgumentParser) -> None:
        """Once every parser is built: a key of the table no flag has is a mistake worth stopping for."""
        if unknown := sorted(set(self.table) - self.used):
            _refuse(parser, f"{self.file}: unknown settings in [{self.section}]: {', '.join(unknown)}")


class ConfiguredParser(argparse.ArgumentParser):
    """An ArgumentParser whose flags (its groups' and its subcommands' too) take their defaults from `settings`,
    and which offers --config."""

    def __init__(self, *args, settings: Settings, **kwargs):
        self.settings = settings  # before ArgumentParser adds --help through add_argument
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--config",
            type=Path,
            metavar="FILE",
            help=f"TOML file whose [{settings.section}] table sets defaults (env DISTINFER_CONFIG)",
        )

    def add_argument(self, *flags, **kwargs):
        return super().add_argument(*flags, **self.settings.flag_arguments(self, flags, kwargs))

    def add_argument_group(self, *args, **kwargs):
        group = super().add_argument_group(*args, **kwargs)
        add = group.add_argument
        group.add_argument = lambda *flags, **kw: add(*flags, **self.settings.flag_arguments(self, flags, kw))
        return group

    def add_subparsers(self, **kwargs):
        kwargs.setdefault("parser_class", functools.partial(ConfiguredParser, settings=self.settings))
        return super().add_subparsers(**kwargs)


class _AppendOverDefault(argparse.Action):
    """A repeatable flag whose default came from the environment or the file: given on the command line, its
    values replace that default (flags win) instead of adding to it."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, [*([] if current is self.default or current is None else current), values])


def _refuse(parser: argparse.ArgumentParser, message: str) -> None:
    """A bad setting from the environment or the file: its source says where it is, so no usage text (which
    would be a subcommand's that the user may not have run)."""
    parser.exit(2, f"{parser.prog.split()[0]}: error: {message}\n")


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
