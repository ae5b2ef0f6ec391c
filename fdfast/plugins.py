"""Plugin hook: every "fdfast.plugins" entry point is loaded once and called, so it can register names.

A plugin is a zero-argument callable exposed in a package's metadata, e.g. in pyproject.toml::

    [project.entry-points."fdfast.plugins"]
    demo = "fdfast.demo.register:register"

It registers what it provides through the library's registries (``fdfast.data.register_source``,
``fdfast.models.teachers.register_teacher``). The registries call ``load_plugins()`` before a lookup,
so nothing is imported until a name is needed. A plugin that fails to import or to register does not
break commands that never need it: its error is recorded, and ``missing_name_error`` names it (and the
fix) only when a lookup misses. By convention a plugin's names start with ``<entry point name>-``
(``demo-images``), which lets the error point at the one plugin that should have provided the name.
"""
from __future__ import annotations

import threading
import traceback
from importlib import metadata
from typing import Callable, Dict, Iterable, List, Optional

from fdfast.errors import FDFastError

__all__ = ["GROUP", "load_plugins", "loaded_plugins", "plugin_failures", "missing_name_error", "reset_plugins"]

GROUP = "fdfast.plugins"

# RLock: a plugin's register() may reach a registry that calls load_plugins() again (same thread);
# the _state check below turns that inner call into a no-op instead of a deadlock or a second load.
_lock = threading.RLock()
_state = "new"  # "new" -> "loading" -> "done"
_loaded: List[str] = []
_failures: Dict[str, str] = {}  # entry point name -> "value: ExcType: message"


def _entry_points() -> Iterable[metadata.EntryPoint]:
    return metadata.entry_points(group=GROUP)


def load_plugins() -> None:
    """Load and call every entry point of the group ``fdfast.plugins`` once per process."""
    global _state
    if _state == "done":
        return
    with _lock:
        if _state != "new":  # done by another thread meanwhile, or re-entered from a plugin
            return
        _state = "loading"
        try:
            for ep in sorted(_entry_points(), key=lambda e: e.name):
                _call(ep)
        finally:
            _state = "done"


def _call(ep: metadata.EntryPoint) -> None:
    try:
        fn: Callable[[], object] = ep.load()
        fn()
    except Exception as e:  # recorded, raised later only for a name this plugin would provide
        last = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ else []
        where = f" at {last[0].filename}:{last[0].lineno}" if last else ""
        text = " ".join(str(e).split())  # one line: the CLI prints errors as a single line
        _failures[ep.name] = f"{ep.value}: {type(e).__name__}: {text}{where}"
    else:
        _loaded.append(ep.name)


def loaded_plugins() -> List[str]:
    """Names of the entry points loaded and called without error (after ``load_plugins()``)."""
    load_plugins()
    return list(_loaded)


def plugin_failures() -> Dict[str, str]:
    """Entry point name -> error, for the plugins that failed to import or register."""
    load_plugins()
    return dict(_failures)


def missing_name_error(kind: str, name: str, known: Iterable[str], register_fn: str) -> FDFastError:
    """The error for an unknown ``name`` of a registry of ``kind``s: names a failed plugin and its fix.

    ``register_fn`` is the registry's register function, quoted in the fix for the no-plugin case.
    """
    known = sorted(known)
    failures = plugin_failures()
    owner: Optional[str] = next((p for p in failures if name == p or name.startswith(p + "-")), None)
    if owner is not None:
        fix = " (for the bundled demo: `pip install -e \".[demo]\"`; setup.sh does this)" if owner == "demo" else ""
        return FDFastError(f"{kind} {name!r} comes from the fdfast plugin {owner!r}, which failed to load "
                           f"({failures[owner]}); fix that error{fix} or pick another name")
    msg = f"unknown {kind} {name!r}; known: {', '.join(known) or '(none)'}"
    if failures:
        listed = "; ".join(f"{p}: {err}" for p, err in sorted(failures.items()))
        return FDFastError(f"{msg} (these fdfast plugins failed to load and may provide it: {listed})")
    hint = ""
    if name.startswith("demo-") and "demo" not in _loaded:
        hint = " (the demo plugin is not registered: run `pip install -e . --no-deps` to install its entry point)"
    return FDFastError(f"{msg}{hint}; or register it with {register_fn}")


def reset_plugins() -> None:
    """Forget what was loaded so the next ``load_plugins()`` runs again (tests only)."""
    global _state
    with _lock:
        _state = "new"
        _loaded.clear()
        _failures.clear()
