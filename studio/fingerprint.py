"""A fingerprint of the model state: parameters, tokenizer additions and installed hooks.

Two pipelines with the same fingerprint generate the same images for the same request.
Tests use it to check exact undo; the UI shows its first characters.
"""
from __future__ import annotations

import hashlib

import torch

from .edits import COMPONENTS, named_tensors


def tensor_digest(t: torch.Tensor) -> str:
    """Hash of a tensor's dtype, shape and exact bytes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _hook_signature(pipe) -> list[str]:
    sig = []
    for c in COMPONENTS:
        module = getattr(pipe, c, None)
        if module is None:
            continue
        for name, m in module.named_modules():
            hooks = [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
            processor = getattr(m, "processor", None)
            if processor is not None:
                hooks.append(processor)
            if hasattr(vars(m).get("forward"), "fingerprint"):  # a forward swapped in by an edit
                hooks.append(m.forward)
            for h in hooks:
                sig.append(f"{c}.{name}:{getattr(h, 'fingerprint', lambda: type(h).__qualname__)()}")
    return sig


def fingerprint(pipe) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(named_tensors(pipe).items()):
        h.update(name.encode())
        h.update(tensor_digest(t).encode())
    tok = getattr(pipe, "tokenizer", None)
    if tok is not None:
        h.update(f"tokenizer:{len(tok)}:{sorted(tok.get_added_vocab().items())}".encode())
    for line in _hook_signature(pipe):
        h.update(line.encode())
    return h.hexdigest()
