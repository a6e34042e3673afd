"""Keep the garbage collector off the objects a long-running process is made of."""

from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    """Move every object alive now (imported modules, their functions and classes: ~200,000 once torch and
    transformers are in) to a generation the collector never walks.

    Rows cross these processes as short-lived objects, and each collection of the old generation used to walk
    the whole import graph again: building a batch's rows on an executor took five times as long.
    Objects frozen here still go when nothing refers to them; only those caught in reference cycles stay
    (modules and their classes, which live as long as the process anyway).
    """
    gc.collect()
    gc.freeze()
