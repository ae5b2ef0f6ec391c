"""Check user-given model kwargs against the class they go to: timm's factories drop unknown ones silently."""
from __future__ import annotations

import difflib
import inspect

from fdfast.errors import FDFastError


def check_kwargs(cls: type, kwargs: dict, key: str) -> None:
    """Raise FDFastError naming every kwarg that ``cls.__init__`` does not take (and the nearest that it does)."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # the class forwards **kwargs itself
    known = [n for n in params if n != "self"]
    unknown = [k for k in kwargs if k not in known]
    if unknown:
        hints = []
        for k in unknown:
            near = difflib.get_close_matches(str(k), known, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
        yaml_hint = " (in YAML a mapping needs a space after ':', e.g. {depth: 2})" if any(
            ":" in str(k) for k in unknown) else ""
        raise FDFastError(f"{key}: {cls.__name__} takes no argument {', '.join(hints)}{yaml_hint}")
