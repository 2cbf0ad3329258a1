"""A generation request: validated settings, and noise from one CPU generator per image (seed + i), so
image i is the same alone or in a batch, on CPU or GPU (A1111's "CPU" RNG)."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, PNDMScheduler, UniPCMultistepScheduler)

from .checks import number, whole
from .tokenizer import prompt_text
from . import models
from .errors import StudioError

SAMPLERS = {
    "DPM++ 2M": DPMSolverMultistepScheduler,
    "Euler": EulerDiscreteScheduler,
    "Euler a": EulerAncestralDiscreteScheduler,
    "DDIM": DDIMScheduler,
    "UniPC": UniPCMultistepScheduler,
    "PNDM": PNDMScheduler,
}
MAX_SIDE, MAX_STEPS, MAX_BATCH, MAX_SEED = 2048, 200, 16, 2**32 - 1


def parse_seed(seed) -> int:
    """Accept whole numbers and numeric strings; -1 (or empty) picks a random seed."""
    if seed is None or (isinstance(seed, str) and not seed.strip()):
        seed = -1
    try:
        value = whole("seed", seed, -1, MAX_SEED)
    except StudioError:
        raise StudioError(f"seed must be a whole number from 0 to {MAX_SEED}, or -1 for random "
                          f"(got {seed!r})") from None
    return random.randint(0, MAX_SEED) if value == -1 else value


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    seed: int | str = 0
    steps: int = 20
    guidance: float = 7.5
    width: int | None = None
    height: int | None = None
    batch: int = 1
    sampler: str = "DPM++ 2M"
    warnings: list[str] = field(default_factory=list)

    def validated(self, pipe) -> "GenerationRequest":
        """A copy with defaults filled in and every field checked (a StudioError on bad input)."""
        model = models.of(pipe)
        default, multiple = model.default_size, model.size_multiple
        r = GenerationRequest(prompt_text(self.prompt), prompt_text(self.negative_prompt, "negative prompt"),
                              parse_seed(self.seed),
                              whole("steps", self.steps, 1, MAX_STEPS), number("guidance", self.guidance, 0, 50),
                              whole("width", self.width or default), whole("height", self.height or default),
                              whole("batch size", self.batch, 1, MAX_BATCH), self.sampler)
        for side in ("width", "height"):
            v = getattr(r, side)
            if v % multiple:
                raise StudioError(f"{side} {v} is not a multiple of {multiple}; try {max(multiple, round(v / multiple) * multiple)}")
            if not multiple <= v <= MAX_SIDE:
                raise StudioError(f"{side} {v} is outside {multiple}..{MAX_SIDE}")
        if r.sampler not in SAMPLERS:
            raise StudioError(f"unknown sampler {r.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        r.warnings = [w for w in (prompt_overflow(pipe.tokenizer, r.prompt, "prompt"),
                                  prompt_overflow(pipe.tokenizer, r.negative_prompt, "negative prompt")) if w]
        return r

    @property
    def seeds(self) -> list[int]:
        return [(int(self.seed) + i) % (MAX_SEED + 1) for i in range(self.batch)]

    def noise(self, pipe) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Initial latents (on CPU, fp32) and the per-image generators, continued for ancestral samplers."""
        shape = (1, *models.of(pipe).latent_shape(self.height, self.width))
        gens = [torch.Generator("cpu").manual_seed(s) for s in self.seeds]
        return torch.cat([torch.randn(shape, generator=g) for g in gens]), gens


def prompt_overflow(tokenizer, text: str, what: str) -> str | None:
    """A warning if `text` is longer than the text encoder reads (it is then truncated)."""
    ids = tokenizer(text, truncation=False, verbose=False).input_ids if text else []
    limit = tokenizer.model_max_length
    if len(ids) <= limit:
        return None
    kept = " ".join(tokenizer.decode(ids[1 : limit - 1]).replace("</w>", " ").split())
    return (f"The {what} is {len(ids) - 2} tokens; the model reads {limit - 2}. "
            f"It was truncated after: …{kept[-40:]}")
