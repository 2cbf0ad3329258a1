"""Maps for any image: noised to timestep t, one UNet pass with the prompt; `repeats` averages noise draws."""
from __future__ import annotations

import time

import torch

from .. import models
from ..capture import capture, encoded, noised, noising
from ..errors import StudioError
from ..generation import parse_seed
from ..images import load_rgb, square
from ..tokenizer import sequence_length
from .result import AttentionResult, from_session

DEFAULT_TIMESTEP = 100


def image_maps(manager, image, prompt: str, timestep: int = DEFAULT_TIMESTEP, seed=0, negative: str = "",
               repeats: int = 1, heads: bool = False, self_attention: bool = True) -> AttentionResult:
    """Maps (and self-attention Q/K) of `prompt` on an image noised to `timestep`."""
    image = load_rgb(image)[0]
    prompt, negative = str(prompt or ""), str(negative or "")
    if not prompt.strip():
        raise StudioError("type a prompt that describes the image: its words get the maps")
    seed = parse_seed(seed)
    with manager.job():
        pipe, model = manager.pipe, models.of(manager.pipe)
        timestep, repeats = noising(pipe, timestep, repeats)
        size = model.default_size
        shown = square(image, size)
        start = time.perf_counter()
        rows = [negative, prompt] if negative else [prompt]
        with capture(manager, heads=heads, negative=bool(negative), tokens=sequence_length(pipe.tokenizer, *rows),
                     self_steps=(0,) if self_attention else ()) as session, torch.no_grad():
            noisy, t = noised(model, shown, timestep, repeats, seed)
            session.begin(bool(negative), noisy.shape[-2:])
            manager.check_stop()
            model.predict(noisy.repeat(len(rows), 1, 1, 1), t, encoded(model, rows, repeats))
        settings = dict(mode="image", timestep=timestep, repeats=repeats, noise_seed=seed, width=size, height=size,
                        original_size=list(image.size), model=manager.describe())
        result = from_session(session, mode="image", images=[shown], prompt=prompt, negative=negative, seeds=[seed],
                              steps=1, tokenizer=pipe.tokenizer, settings=settings,
                              seconds=time.perf_counter() - start)
    result.means = {n: m.mean(1, keepdim=True) for n, m in result.means.items()}
    result.self_qk = {s: {n: (q[:1], k[:1]) for n, (q, k) in d.items()} for s, d in result.self_qk.items()}
    return result
