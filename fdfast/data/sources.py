"""Named data sources: folders of images that a plugin prepares on demand (the demo's photos, its labelled set).

The library owns the registry; plugins fill it (``fdfast.plugins``), so the library never imports them::

    register_source("demo-images", demo_image_dir, "real photos scikit-image ships (flat folder)")
    source_dir("demo-images")   # -> Path, prepared on first use
    source_dir(None)            # the default source: what data.path=None reads

Lookups load the plugins first. An unknown name, or a name of a plugin that failed to load, is an
FDFastError naming the fix.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fdfast.errors import FDFastError

__all__ = ["DataSource", "DEFAULT_SOURCE", "RESERVED_SOURCES", "register_source", "source_dir", "source_names",
           "source_rows"]

DEFAULT_SOURCE = "demo-images"  # data.path=None (and diagnose without --data) reads this one
# Names kept for sources a plugin provides; a lookup before it registers says what the name is for.
RESERVED_SOURCES = {
    "demo-images": "the real photos scikit-image ships, as one flat folder of JPEGs (the demo plugin)",
    "demo-labelled": "a labelled ImageFolder set (one subfolder per class, train/val split; the demo plugin)",
}


@dataclass(frozen=True)
class DataSource:
    name: str
    fn: Callable[[], object]  # () -> folder (str or Path), prepared on first call, cached by the plugin
    help: str


_SOURCES: dict[str, DataSource] = {}
_lock = threading.Lock()


def register_source(name: str, fn: Callable[[], object], help: str, *, replace: bool = False) -> DataSource:
    """Add the data source ``name``; registering the same function again is a no-op, another one needs replace."""
    if not name or not isinstance(name, str) or any(c.isspace() for c in name):
        raise FDFastError(f"data source name must be a non-empty word, got {name!r}")
    if not callable(fn):
        raise FDFastError(f"data source {name!r}: fn must be callable () -> folder, got {type(fn).__name__}")
    source = DataSource(name, fn, help)
    with _lock:
        old = _SOURCES.get(name)
        if old is not None and old.fn is not fn and not replace:
            raise FDFastError(f"data source {name!r} is already registered ({old.help}); pick another name "
                              "or pass replace=True")
        _SOURCES[name] = source
    return source


def _entry(name: str) -> DataSource:
    from fdfast.plugins import load_plugins, missing_name_error, plugin_failures

    load_plugins()
    source = _SOURCES.get(name)
    if source is not None:
        return source
    msg = str(missing_name_error("data source", name, _SOURCES, "fdfast.data.register_source(name, fn, help)"))
    if name in RESERVED_SOURCES and not plugin_failures():
        msg += f" (the name {name!r} is reserved for {RESERVED_SOURCES[name]})"
    if name == DEFAULT_SOURCE:
        msg += "; or pass --data DIR (data.path) to read your own images"
    raise FDFastError(msg)


def source_dir(name: str | None = None) -> Path:
    """The folder of the data source ``name`` (None: DEFAULT_SOURCE), prepared by its plugin if needed."""
    name = DEFAULT_SOURCE if name is None else name
    path = Path(_entry(name).fn())
    if not path.is_dir():
        raise FDFastError(f"data source {name!r} gave {path}, which is not a folder; delete it from the cache "
                          "($FDFAST_CACHE or ~/.cache/fdfast) so it is prepared again")
    return path


def source_names() -> list[str]:
    from fdfast.plugins import load_plugins

    load_plugins()
    return sorted(_SOURCES)


def source_rows() -> list[dict]:
    """One {"name", "help"} per registered source, for listings."""
    return [{"name": n, "help": _SOURCES[n].help} for n in source_names()]
