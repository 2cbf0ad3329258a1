"""Export a view: the PNG grid, the maps (.npz of probabilities: `word_maps`, `token_maps`, `layer__<name>`,
`step__<name>`) and a JSON manifest of how they were made."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import StudioError
from ..tokenizer import prompt_ids
from .maps import layer_names, token_maps, word_maps
from .result import AttentionResult
from .view import View, render_view


def export(result: AttentionResult, view: View, out_dir: str | Path) -> list[Path]:
    """Write grid.png, image-<i>.png, maps.npz and manifest.json into out_dir; their paths."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StudioError(f"cannot write to {str(out)!r}: {exc.strerror or exc}") from None
    rendered, sel = render_view(result, view), view.selection
    paths = [out / "grid.png", *(out / f"image-{i}.png" for i in range(len(result.images))), out / "maps.npz"]
    rendered.grid(result.images[view.image], view).save(paths[0])
    for path, im in zip(paths[1:], result.images):
        im.save(path)
    arrays = {"word_maps": word_maps(result, rendered.words, sel)[1].numpy().astype(np.float32),
              "token_maps": token_maps(result, sel).numpy().astype(np.float32),
              **{f"layer__{name}": m.numpy() for name, m in result.means.items()},
              **{f"step__{name}": m.numpy() for name, m in (result.per_step or {}).items()}}
    np.savez_compressed(paths[-1], **arrays)
    chosen = layer_names(result, sel)
    manifest = dict(
        prompt=result.prompt, negative_prompt=result.negative, seeds=result.seeds, mode=result.mode,
        steps_captured=result.steps, steps=list(sel.steps) if sel.steps else [0, result.steps - 1],
        tau=view.tau, normalization=view.normalization, head=sel.head, branch=sel.branch,
        words=[dict(word=w.text, token_positions=list(w.positions)) for w in rendered.words],
        tokens=result.tokenizer.convert_ids_to_tokens(prompt_ids(result.tokenizer, result.prompt)),
        layers=[dict(name=n, block=layer.block, h=layer.h, w=layer.w, used=n in chosen)
                for n, layer in result.layers.items()],
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
    if isinstance(v, np.generic):
        return v.item()
    return list(v) if isinstance(v, set) else str(v)
