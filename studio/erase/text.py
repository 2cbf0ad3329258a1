"""Text-encoder vectors of concepts in prompt templates: what the closed-form edits and the guard act on."""
from __future__ import annotations

import torch

from .. import models
from ..errors import StudioError

TEMPLATES = {
    "object": ["{}", "a {}", "a photo of a {}", "a picture of a {}"],
    "style": ["{}", "art by {}", "a painting in the style of {}", "{} style"],
    "none": ["{}"],
}  # a preset is a list, or a function concept -> list (the toy world registers "toy")


def templates_for(spec, concept: str = "") -> list[str]:
    """A preset name (see TEMPLATES) or a list of templates with one '{}' each."""
    if isinstance(spec, str):
        if spec not in TEMPLATES:
            raise StudioError(f"unknown template preset {spec!r}; use one of {', '.join(TEMPLATES)} or a list")
        preset = TEMPLATES[spec]
        return preset(concept) if callable(preset) else preset
    templates = [t for t in spec if t.strip()]
    bad = [t for t in templates if t.count("{}") != 1]
    if bad or not templates:
        raise StudioError(f"each prompt template needs exactly one '{{}}' for the concept (bad: {bad or spec})")
    return templates


@torch.no_grad()
def encode(pipe, prompts: list[str]) -> torch.Tensor:
    """(len(prompts), 77, d) fp32 text-encoder outputs, as the UNet gets them."""
    tok = pipe.tokenizer
    for p in prompts:
        n = len(tok(p).input_ids)
        if n > tok.model_max_length:
            raise StudioError(f"prompt {p[:60]!r} is {n} tokens; the text encoder reads {tok.model_max_length}")
    return models.of(pipe).encode(prompts).embeds.float()


def word_start(tokenizer, template: str, word: str) -> tuple[int, int]:
    """(first position, token count) of `word` filled into `template` (SOS is 0; an empty word counts 0)."""
    prefix = template.split("{}")[0].strip()
    start = 1 + (len(tokenizer(prefix, add_special_tokens=False).input_ids) if prefix else 0)
    return start, len(tokenizer(word, add_special_tokens=False).input_ids) if word.strip() else 0


def concept_rows(pipe, templates: list[str], concept: str, target: str, tokens: str = "to_end"):
    """(n, d) fp32 vectors of the concept in each template, and of the target in the same template, paired.

    'to_end' (UCE's; CLIP's causal encoder carries the concept on): every position from the concept's first
    token, aligned with the target's; 'word': the concept's tokens, each with the target's at that offset (or its last).
    """
    if tokens not in ("to_end", "word"):
        raise StudioError(f"tokens must be 'to_end' or 'word' (got {tokens!r})")
    emb = encode(pipe, [t.format(concept) for t in templates] + [t.format(target) for t in templates])
    n, length = len(templates), emb.shape[1]
    rows_c, rows_t = [], []
    for i, template in enumerate(templates):
        (sc, nc), (st, nt) = word_start(pipe.tokenizer, template, concept), word_start(pipe.tokenizer, template, target)
        if tokens == "to_end":
            span = length - max(sc, st)
            rows_c.append(emb[i, sc:sc + span])
            rows_t.append(emb[n + i, st:st + span])
        else:
            rows_c.append(emb[i, sc:sc + nc])
            rows_t.append(emb[n + i, [st + min(j, max(nt - 1, 0)) for j in range(nc)]])
    return torch.cat(rows_c), torch.cat(rows_t)
