"""The simplest real weight edit: scale the parameters whose names match a pattern.

It exists to exercise the edit stack end to end (and to dim or boost a layer by hand);
the erasure, customization and extraction packages bring the useful edits.
"""
from __future__ import annotations

import re

from .edits import Edit, edit_kind, named_tensors
from .errors import StudioError

MAX_TENSORS = 512


@edit_kind("scale")
def apply_scale(pipe, params: dict, tensors: dict, patch) -> None:
    pattern, factor = params.get("pattern", ""), params.get("factor")
    if not isinstance(factor, (int, float)) or factor != factor or abs(factor) > 1e4:
        raise StudioError(f"scale factor must be a finite number (got {factor!r})")
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise StudioError(f"layer pattern {pattern!r} is not a valid regular expression: {exc}") from None
    names = [n for n in named_tensors(pipe) if rx.search(n)] if pattern else []
    if not names:
        raise StudioError(f"no parameter name matches {pattern!r} (try e.g. 'attn2\\.to_v\\.weight')")
    if len(names) > MAX_TENSORS:
        raise StudioError(f"{pattern!r} matches {len(names)} tensors; narrow it to at most {MAX_TENSORS}")
    for name in names:
        patch.write(name, patch.read(name).float() * factor)


def scale_edit(pattern: str, factor: float) -> Edit:
    return Edit("scale", {"pattern": pattern, "factor": float(factor)}, label=f"scale /{pattern}/ x{factor:g}")
