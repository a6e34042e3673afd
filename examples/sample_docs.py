"""Where examples/sample.jsonl's text comes from, all of it in the Python 3.11 interpreter: the docstrings of
the standard library's modules below (and their public classes, functions and methods), the Language
Reference sections bundled for help() in pydoc_data.topics, and the Zen of Python. Yields (id, raw text)."""

from __future__ import annotations

import cmd
import contextlib
import importlib
import inspect
import io
import pkgutil
import warnings

MODULES = [
    "abc",
    "aifc",
    "argparse",
    "array",
    "ast",
    "asyncio",
    "base64",
    "bdb",
    "bisect",
    "bz2",
    "calendar",
    "cgi",
    "chunk",
    "cmd",
    "code",
    "codecs",
    "codeop",
    "collections",
    "colorsys",
    "compileall",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "contextvars",
    "copy",
    "copyreg",
    "cProfile",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "dis",
    "doctest",
    "email",
    "enum",
    "filecmp",
    "fileinput",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "getopt",
    "getpass",
    "gettext",
    "glob",
    "graphlib",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "http",
    "imaplib",
    "importlib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "keyword",
    "linecache",
    "locale",
    "logging",
    "lzma",
    "mailbox",
    "mimetypes",
    "modulefinder",
    "multiprocessing",
    "netrc",
    "numbers",
    "operator",
    "optparse",
    "os",
    "pathlib",
    "pdb",
    "pickle",
    "pickletools",
    "pipes",
    "platform",
    "plistlib",
    "poplib",
    "pprint",
    "profile",
    "pstats",
    "py_compile",
    "pyclbr",
    "pydoc",
    "queue",
    "quopri",
    "random",
    "re",
    "reprlib",
    "rlcompleter",
    "runpy",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "signal",
    "site",
    "smtplib",
    "socket",
    "socketserver",
    "sqlite3",
    "ssl",
    "statistics",
    "string",
    "stringprep",
    "struct",
    "subprocess",
    "sunau",
    "symtable",
    "sysconfig",
    "tabnanny",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "token",
    "tokenize",
    "trace",
    "traceback",
    "tracemalloc",
    "types",
    "typing",
    "unittest",
    "urllib",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "wsgiref",
    "xml",
    "xmlrpc",
    "zipapp",
    "zipfile",
    "zipimport",
    "zoneinfo",
]
# Never import these (side effects, GUI, or test-only code).
SKIP_PARTS = {"test", "tests", "__main__", "idle_test", "antigravity", "this"}


def iter_module_names() -> list[str]:
    names = set()
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:  # optional or removed module on this build
            continue
        names.add(name)
        if hasattr(mod, "__path__"):
            for info in pkgutil.walk_packages(mod.__path__, name + ".", onerror=lambda n: None):
                parts = info.name.split(".")
                if SKIP_PARTS & set(parts) or any(x.startswith("_") for x in parts):
                    continue  # tests, scripts and private helper modules
                names.add(info.name)
    return sorted(names)


def iter_docs(modname: str):
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            mod = importlib.import_module(modname)
        except ImportError:  # e.g. a platform-specific submodule
            return
    yield modname, inspect.getdoc(mod)
    for name in sorted(vars(mod)):
        if name.startswith("_"):
            continue
        obj = vars(mod)[name]
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if getattr(obj, "__module__", None) != modname:
            continue  # re-exported from elsewhere; count it once at home
        yield f"{modname}.{obj.__qualname__}", inspect.getdoc(obj)
        if inspect.isclass(obj):
            for attr in sorted(vars(obj)):
                if attr.startswith("_"):
                    continue
                member = vars(obj)[attr]
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if isinstance(member, property):
                    member = member.fget
                if not inspect.isroutine(member):
                    continue
                if attr.startswith("do_") and issubclass(obj, cmd.Cmd):
                    continue  # interactive help text ("c(ont(inue)) ..."), not prose
                qual = getattr(member, "__qualname__", f"{obj.__qualname__}.{attr}")
                # getdoc() would inherit the base class docstring; use our own.
                yield f"{modname}.{qual}", inspect.cleandoc(member.__doc__ or "")


def zen_of_python() -> str:
    import codecs

    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return codecs.decode(this.s, "rot13")


def reference_topics():
    """Sections of the Python Language Reference bundled for pydoc's help()."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield f"pydoc_data.topics.{key}", topics[key]
