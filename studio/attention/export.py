"""Export a view: the PNG grid, the raw maps (.npz) and a JSON manifest that says how they were made.

maps.npz holds attention probabilities, not pixels: `word_maps` (B, W, h, w) for the view's
selection, `token_maps` (B, T, h, w), every layer's mean map `layer__<name>` (branches, B, N, T)
and, when kept, every step's `step__<name>` (S, branches, B, N, T). The manifest records prompt,
seeds, layers, steps, tau and the rest, so a figure can be remade from the files alone.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import StudioError
from .maps import layer_names, token_maps, word_maps
from .result import AttentionResult
from .view import View, render_view


def export(result: AttentionResult, view: View, out_dir: str | Path) -> list[Path]:
    """Write grid.png, image-<i>.png, maps.npz and manifest.json into out_dir; returns the paths."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StudioError(f"cannot write to {str(out)!r}: {exc.strerror or exc}") from None
    rendered = render_view(result, view)
    paths = [out / "grid.png"]
    rendered.grid(result.images[view.image], view).save(paths[0])
    for i, im in enumerate(result.images):
        paths.append(out / f"image-{i}.png")
        im.save(paths[-1])
    _, words_all = word_maps(result, rendered.words, view.selection)
    arrays = {"word_maps": words_all.numpy().astype(np.float32),
              "token_maps": token_maps(result, view.selection).numpy().astype(np.float32)}
    for name, m in result.means.items():
        arrays[f"layer__{name}"] = m.numpy()
    for name, m in (result.per_step or {}).items():
        arrays[f"step__{name}"] = m.numpy()
    paths.append(out / "maps.npz")
    np.savez_compressed(paths[-1], **arrays)
    chosen = layer_names(result, view.selection)
    manifest = dict(
        prompt=result.prompt, negative_prompt=result.negative, seeds=result.seeds, mode=result.mode,
        steps_captured=result.steps,
        steps=list(view.selection.steps) if view.selection.steps else [0, result.steps - 1],
        tau=view.tau, normalization=view.normalization, head=view.selection.head, branch=view.selection.branch,
        words=[dict(word=w.text, token_positions=list(w.positions)) for w in rendered.words],
        tokens=result.tokenizer.convert_ids_to_tokens(
            result.tokenizer(result.prompt, truncation=True, max_length=result.tokenizer.model_max_length).input_ids),
        layers=[dict(name=n, block=result.layers[n].block, h=result.layers[n].h, w=result.layers[n].w,
                     used=n in chosen) for n in result.layers],
        branches=list(result.branches), heads_kept=result.heads, per_step_kept=result.per_step is not None,
        self_attention_steps=sorted(result.self_qk), view=view.describe(), settings=result.settings,
        summary=dict(rows=rendered.summary["rows"],
                     overlaps=[dict(a=a, b=b, overlap=v) for (a, b), v in rendered.summary["overlaps"].items()]),
        control_log=result.control_log, files=[p.name for p in paths] + ["manifest.json"],
    )
    paths.append(out / "manifest.json")
    paths[-1].write_text(json.dumps(manifest, indent=1, default=_jsonable))
    return paths


def _jsonable(v):
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, (set, tuple)):
        return list(v)
    return str(v)
