"""fdfast: a fast, memory-lean trainer for Feature Distillation (Wei et al., 2022).

``import fdfast`` is the drop-in entry: ``FDLoss``, the shared-bias attention (``RPBAttention``,
``patch_model``), ``build_teacher`` / ``build_student`` / ``load_student``. Names resolve lazily so that
``import fdfast`` stays cheap and never imports Triton, DALI or open_clip on its own.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "FDLoss": "fdfast.loss",
    "functional": "fdfast.functional",
    "RPBAttention": "fdfast.attention",
    "patch_model": "fdfast.attention",
    "build_student": "fdfast.models.student",
    "build_teacher": "fdfast.models.teachers",
    "load_student": "fdfast.models.export",
    "Config": "fdfast.config",
    "load_config": "fdfast.config",
    "FDFastError": "fdfast.errors",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name in _API:
        module = importlib.import_module(_API[name])
        value = module if name == "functional" else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fdfast' has no attribute {name!r}")


def __dir__():
    return __all__
