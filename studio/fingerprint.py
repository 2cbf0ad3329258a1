"""A fingerprint of the model state (parameters, tokenizer additions, installed hooks): equal fingerprints,
equal images for the same request."""
from __future__ import annotations

import hashlib
import json

import torch

from . import models, steering
from .edits import COMPONENTS, named_tensors


def tensor_digest(t: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def edit_digest(params: dict, tensors: dict) -> str:
    """Short hash of an edit's parameters and tensors: what its steering objects report to the fingerprint."""
    h = hashlib.blake2b(json.dumps(params, sort_keys=True).encode(), digest_size=8)
    for name in sorted(tensors):
        h.update(f"{name}:{tensor_digest(tensors[name])}".encode())
    return h.hexdigest()


def _hook_signature(pipe) -> list[str]:
    sig = []
    for c, module in ((c, getattr(pipe, c, None)) for c in COMPONENTS):
        for name, m in module.named_modules() if module is not None else ():
            hooks = [*m._forward_hooks.values(), *m._forward_pre_hooks.values(), getattr(m, "processor", None)]
            if hasattr(vars(m).get("forward"), "fingerprint"):  # a forward swapped in by an edit
                hooks.append(m.forward)
            sig += [f"{c}.{name}:{getattr(h, 'fingerprint', lambda: type(h).__qualname__)()}" for h in hooks
                    if h is not None]
    return sig


def fingerprint(pipe) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(named_tensors(pipe).items()):
        h.update(f"{name}{tensor_digest(t)}".encode())
    for tok in models.of(pipe).tokenizers:  # the tokens concepts added
        h.update(f"tokenizer:{len(tok)}:{sorted(tok.get_added_vocab().items())}".encode())
    for line in _hook_signature(pipe) + [s.signature() for s in steering.slots(pipe)]:
        h.update(line.encode())
    return h.hexdigest()
