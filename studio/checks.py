"""Checks written once: numbers from a user or a file, the model a saved thing was made on, atomic writes."""
from __future__ import annotations

import math
import os
import uuid
from pathlib import Path

from .errors import StudioError
from .fingerprint import tensor_digest


def _float(v) -> float | None:
    try:
        return None if isinstance(v, bool) else float(v)  # True is not a number a user meant
    except (TypeError, ValueError, OverflowError):
        return None


def _bounds(lo, hi, lo_open: bool = False) -> str:
    """' from 0 to 1', ' above 0 up to 1', ' from 1', ' up to 5' or ''."""
    g = lambda x: f"{x:g}" if isinstance(x, float) else str(x)  # noqa: E731
    low = "" if lo is None else f" {'above' if lo_open else 'from'} {g(lo)}"
    return low + ("" if hi is None else f" {'to' if low and not lo_open else 'up to'} {g(hi)}")


def _outside(f, lo, hi, lo_open: bool = False) -> bool:
    return (lo is not None and (f < lo or lo_open and f == lo)) or (hi is not None and f > hi)


def number(name: str, v, lo=None, hi=None, *, lo_open: bool = False) -> float:
    bounds, f = _bounds(lo, hi, lo_open), _float(v)
    if f is None or not math.isfinite(f):
        raise StudioError(f"{name} must be a finite number{bounds} (got {v!r})")
    if _outside(f, lo, hi, lo_open):
        raise StudioError(f"{name} must be a number{bounds} (got {v!r})")
    return f


def whole(name: str, v, lo=None, hi=None) -> int:
    """`v` (a whole number, 3.0 or "3" included) as an int from lo to hi; otherwise a StudioError."""
    bounds, f = _bounds(lo, hi), _float(v)
    if f is None or not math.isfinite(f) or f != int(f):
        raise StudioError(f"{name} must be a whole number{bounds} (got {v!r})")
    if _outside(int(f), lo, hi):
        raise StudioError(f"{name} must be{bounds} (got {v!r})")
    return int(f)


def known(params: dict, allowed, what: str) -> None:
    """Refuse parameters no version of the edit ever had (a typo, a foreign file)."""
    if unknown := set(params) - set(allowed):
        raise StudioError(f"unknown {what} parameter(s): {', '.join(sorted(unknown))}")


def base_signature(pipe) -> str:
    """The UNet's input convolution (no edit touches it): what is learned on one model is refused on another."""
    return tensor_digest(pipe.unet.conv_in.weight)[:16]


def check_base(pipe, params: dict, what: str | None = None,
               fix: str = "load that model, or train the concept again here") -> None:
    base = params.get("base_model")
    if base and base != (here := base_signature(pipe)):
        what = what or f"{params.get('token') or 'this concept'} was learned"
        raise StudioError(f"{what} on another model (signature {base}, this one is {here}): {fix}")


def write_atomically(path, write) -> Path:
    """write(tmp) beside `path`, fsync, rename: a crash leaves the old file or the new one, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return path
