"""The simplest real weight edit: scale the parameters whose names match a pattern (to dim or boost a layer)."""
from __future__ import annotations

import time

import regex

from .checks import number
from .edits import Edit, edit_kind, named_tensors
from .errors import StudioError

MAX_TENSORS, MAX_PATTERN, MATCH_SECONDS = 512, 200, 1.0


def matching(names, pattern: str) -> list[str]:
    """The names `pattern` finds; its length and matching time are bounded, so no input holds the server."""
    if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN:
        raise StudioError(f"a layer pattern is text of at most {MAX_PATTERN} characters")
    try:
        rx = regex.compile(pattern)
    except regex.error as exc:
        raise StudioError(f"layer pattern {pattern!r} is not a valid regular expression: {exc}") from None
    deadline = time.monotonic() + MATCH_SECONDS
    try:
        return [n for n in names if rx.search(n, timeout=max(deadline - time.monotonic(), 1e-3))]
    except TimeoutError:
        raise StudioError(f"layer pattern {pattern!r} takes over {MATCH_SECONDS:g} s to match: simplify it") from None


@edit_kind("scale")
def apply_scale(pipe, params: dict, tensors: dict, patch) -> None:
    pattern, factor = params.get("pattern", ""), number("scale factor", params.get("factor"), -1e4, 1e4)
    names = matching(named_tensors(pipe), pattern) if pattern else []
    if not names:
        raise StudioError(f"no parameter name matches {pattern!r} (try e.g. 'attn2\\.to_v\\.weight')")
    if len(names) > MAX_TENSORS:
        raise StudioError(f"{pattern!r} matches {len(names)} tensors; narrow it to at most {MAX_TENSORS}")
    for name in names:
        patch.write(name, patch.read(name).float() * factor)


def scale_edit(pattern: str, factor: float) -> Edit:
    return Edit("scale", {"pattern": pattern, "factor": float(factor)}, label=f"scale /{pattern}/ x{factor:g}")
