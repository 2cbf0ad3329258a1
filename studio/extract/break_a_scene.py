"""Break-A-Scene: one token per masked object of one image. Phase 1 trains the tokens, phase 2 tokens and a
LoRA (published: the whole UNet), on random subsets "a <a> and a <b>" (union sampling): the diffusion loss in
their masks (or, with `isolate`, on a picture of just them) plus an attention loss pulling maps to masks."""
from __future__ import annotations

import time
from contextlib import ExitStack

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from .. import models, steering, training
from ..capture import CaptureProcessor, attention_probs, project_qk
from ..checks import base_signature, number, whole
from ..edits import Edit, Patch
from ..errors import StudioError
from ..generation import GenerationRequest, parse_seed
from ..tokenizer import check_token
from ..training import LORA_TARGETS, TokenHook, TrainingImage, check_no_adapters, concept_label, is_toy

# published: phase 1 lr 5e-4 (tokens), phase 2 lr 2e-6 (full UNet + tokens); with a LoRA we use 1e-4.
# Toy model: attention weight 0.1 (bench_extract, scene 11: the second token's shape 38% -> 100% vs 1e-2)
DEFAULTS = dict(steps_tokens=400, steps_joint=400, lr_tokens=5e-4, lr_joint=1e-4, toy_lr_tokens=5e-3,
                toy_lr_joint=1e-3, toy_steps_tokens=150, toy_steps_joint=350, attention_weight=1e-2,
                toy_attention_weight=0.1)


class AttentionMaps:
    """A steering 'attention' slot keeping, with gradients, the head-mean cross-attention at one resolution."""

    def __init__(self, resolution: int):
        self.resolution, self.maps = resolution, []

    @classmethod
    def install(cls, patch, pipe, resolution: int) -> "AttentionMaps":
        maps = cls(resolution)
        steering.install(patch, pipe, "attention", "Break-A-Scene attention maps", maps,
                         models.of(pipe).attention_sites(cross=True))
        return maps

    def wrap(self, site, attn, processor):
        return CaptureProcessor(processor, self, site)

    def on_cross(self, name, attn, hidden_states, context) -> None:
        if hidden_states.shape[1] == self.resolution ** 2:
            q, k = project_qk(attn, hidden_states, context)
            self.maps.append(attention_probs(attn, q, k).mean(1))


def attention_loss(probs: torch.Tensor, positions: list[list[torch.Tensor]], masks: list[torch.Tensor]):
    """Mean over images of the MSE of each concept's token map (over its peak) and its mask."""
    total = probs.new_zeros(())
    side = int(round(probs.shape[1] ** 0.5))
    for b, (pos_b, masks_b) in enumerate(zip(positions, masks)):
        for pos, mask in zip(pos_b, masks_b):
            m = probs[b, :, pos].mean(-1).reshape(side, side)
            total = total + F.mse_loss(m / m.max().clamp_min(1e-8), mask)
    return total / len(positions)


def mask_tensor(mask, size: int) -> torch.Tensor:
    """A (size, size) area-averaged float mask in [0, 1] from a 2-D array."""
    m = torch.as_tensor(np.asarray(mask), dtype=torch.float32)
    if m.dim() != 2:
        raise StudioError(f"a mask must be 2-D (got shape {tuple(m.shape)})")
    return F.interpolate(m[None, None], size=(size, size), mode="area")[0, 0]


def isolated(image: TrainingImage, masks: list, keep: tuple[int, ...]) -> TrainingImage:
    """The image with the objects not in `keep` painted over by the background's median colour."""
    size = image.tensor.shape[-1]
    full = torch.stack([mask_tensor(m, size) > 0.5 for m in masks])
    free = ~full.any(0)
    pixels = image.tensor[:, free] if free.any() else image.tensor.reshape(3, -1)
    out = image.tensor.clone()
    out[:, full[[j for j in range(len(masks)) if j not in keep]].any(0)] = pixels.median(dim=1).values[:, None]
    return TrainingImage(out, image.caption, image.name)


def extract_concepts(manager, image: TrainingImage, masks: list, tokens: list[str], *,
                     steps_tokens: int | None = None, steps_joint: int | None = None, lr_tokens: float | None = None,
                     lr_joint: float | None = None, rank: int = 4, lora_targets: str = "attention+ff",
                     attention_weight: float | None = None, background: bool = True, isolate: bool = True,
                     batch: int = 2, seed=0, progress=None, preview=None, preview_every: int = 100) -> Edit:
    """The (unapplied) edit teaching `tokens[i]` the object under `masks[i]`; previews show "a <token>"."""
    pipe = manager.pipe
    toy = is_toy(pipe)
    tokens = [str(t or "").strip() for t in tokens]
    if len(tokens) != len(masks):
        raise StudioError(f"{len(masks)} masks but {len(tokens)} tokens: name one token per mask")
    if len(set(tokens)) != len(tokens):
        raise StudioError("two masks have the same token: give each concept its own name")
    for t in tokens:
        check_token(pipe.tokenizer, t)
    check_no_adapters(pipe.unet)
    defaults = {k: DEFAULTS.get(f"toy_{k}", v) if toy else v for k, v in DEFAULTS.items()}
    get = lambda key, v: defaults[key] if v in (None, "") else v  # noqa: E731

    steps_tokens = whole("token steps", get("steps_tokens", steps_tokens), 0, 20000)
    steps_joint = whole("joint steps", get("steps_joint", steps_joint), 0, 20000)
    lr_tokens = number("lr tokens", get("lr_tokens", lr_tokens), 0, 1)
    lr_joint = number("lr joint", get("lr_joint", lr_joint), 0, 1)
    attention_weight = number("attention weight", get("attention_weight", attention_weight), 0, 100)
    rank, batch, seed = whole("LoRA rank", rank, 1, 256), whole("batch size", batch, 1, 16), parse_seed(seed)
    if lora_targets not in LORA_TARGETS:
        raise StudioError(f"unknown LoRA targets {lora_targets!r}: choose one of {', '.join(LORA_TARGETS)}")
    total = steps_tokens + steps_joint
    if total == 0:
        raise StudioError("no training steps: set token or joint steps above 0")
    latent, resolutions = models.of(pipe).latent_side, models.of(pipe).attention_resolutions()
    attn_res = 16 if 16 in resolutions else max(resolutions)  # the published 16x16 maps where they exist

    with manager.job(), ExitStack() as cleanup:
        family = models.of(pipe)
        unet, device = family.denoiser, family.denoiser.device
        gen = torch.Generator("cpu").manual_seed(seed)
        cleanup.enter_context(training.frozen(pipe))
        patch = Patch(pipe)
        cleanup.callback(patch.undo)
        init = family.text_encoders[0].get_input_embeddings().weight.mean(0).float().cpu()[None]
        ids = [family.install_tokens(t, init, patch)[0] for t in tokens]
        hook = TokenHook(family.text_encoders[0].get_input_embeddings(), ids, init.expand(len(ids), -1))
        cleanup.callback(hook.handle.remove)
        maps = AttentionMaps.install(patch, pipe, attn_res)

        n = len(tokens)
        subsets_all = [tuple(j for j in range(n) if k >> j & 1) for k in range(1, 2 ** n)]
        pictures = [isolated(image, masks, keep) if isolate else image for keep in subsets_all]
        x0_all = family.encode_images(torch.stack([p.tensor for p in pictures])).to(device)
        latent_masks = torch.stack([mask_tensor(m, latent) for m in masks]).to(device)
        attn_masks = torch.stack([mask_tensor(m, attn_res) for m in masks]).to(device)
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

        def loss(step):
            subsets = [torch.randperm(n, generator=gen)[:int(torch.randint(1, n + 1, (1,), generator=gen))].tolist()
                       for _ in range(batch)]
            prompts = ["a " + " and a ".join(tokens[i] for i in s) for s in subsets]
            x0 = x0_all[[subsets_all.index(tuple(sorted(s))) for s in subsets]]
            union = torch.stack([latent_masks[s].amax(0) for s in subsets])[:, None]
            if isolate:  # the isolated pictures are right everywhere
                union = torch.ones_like(union)
            elif background:  # also the pixels no concept claims: "a <a>" then learns a plain background
                union = torch.maximum(union, 1 - latent_masks.amax(0))
            maps.maps.clear()
            ids_batch = family.token_ids(prompts)
            err = training.diffusion_error(family, scheduler, x0, family.encode(prompts, ids_batch), gen)
            value = (err * union).sum() / (union.sum() * err.shape[1]).clamp_min(1)
            if attention_weight and maps.maps:
                positions = [[(ids_batch[b] == ids[i]).nonzero()[:, 0] for i in s] for b, s in enumerate(subsets)]
                value = value + attention_weight * attention_loss(torch.stack(maps.maps).mean(0), positions,
                                                                  [attn_masks[s] for s in subsets])
            return value

        def draw():
            return [manager.generate(GenerationRequest(f"a {tok}", seed=seed)).images[0] for tok in tokens]

        run = dict(total=total, progress=progress, preview=preview, draw=draw, preview_every=preview_every)
        start, lora = time.perf_counter(), {}
        losses = training.train(manager, loss, {"embedding": hook.vectors}, steps_tokens, lr=lr_tokens, **run)
        if steps_joint:  # phase 2: tokens and a LoRA together, a fresh optimiser
            lora = cleanup.enter_context(training.lora(unet, rank, lora_targets, seed))
            losses += training.train(manager, loss, {"embedding": hook.vectors, **lora}, total, lr=lr_joint,
                                     start=steps_tokens, **run)
        tensors = {f"embedding.{i}" if i else "embedding": hook.vectors[i:i + 1].detach().float().cpu().clone()
                   for i in range(n)}
        tensors.update(training.detached(lora))
        seconds = time.perf_counter() - start

    tail = losses[-max(1, len(losses) // 10):]
    params = dict(method="break-a-scene", token=tokens[0], more_tokens=tokens[1:], strength=1.0,
                  modules=sorted({n.rsplit('.', 1)[0] for n in lora}), base_model=base_signature(pipe), steps=total,
                  steps_tokens=steps_tokens, steps_joint=steps_joint, lr_tokens=lr_tokens, lr_joint=lr_joint,
                  rank=rank, lora_targets=lora_targets, attention_weight=attention_weight, batch=batch, seed=seed,
                  background=background, isolate=isolate, train_seconds=round(seconds, 2),
                  final_loss=round(sum(tail) / len(tail), 5))
    return Edit("learned_concept", params, tensors, label=concept_label(params))
