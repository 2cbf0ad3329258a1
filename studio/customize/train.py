"""Teach the model a new concept from a few images: one loss; per method the token alone ("ti"), with every
cross-attention K/V ("custom_diffusion") or with a peft LoRA ("lora") trains. The model is never changed."""
from __future__ import annotations

import random
import re
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from .. import models, training
from ..checks import base_signature, number, whole
from ..edits import Edit, Patch
from ..errors import StudioError
from ..generation import GenerationRequest, parse_seed
from ..tokenizer import check_token
from ..training import LORA_TARGETS, Preview, Progress, TokenHook, TrainingImage, concept_label
from .concept import MAX_VECTORS
from .scope import check_scope

METHODS = {"ti": "Textual Inversion", "custom_diffusion": "Custom Diffusion (token + K/V)", "lora": "LoRA (peft)"}
DEFAULTS = {  # published learning rates (SD-1.5 scale) and the toy model's (~10x larger)
    "ti": dict(lr=5e-4, toy_lr=5e-3, steps=500, toy_steps=400),
    "custom_diffusion": dict(lr=1e-5, toy_lr=1e-4, steps=250, toy_steps=400),
    "lora": dict(lr=1e-4, toy_lr=1e-3, steps=500, toy_steps=400),
}
DEFAULT_TEMPLATES = ("a photo of {}", "a {}", "{}", "a picture of {}", "a photo of a {}")
MAX_STEPS = 20000

def default(pipe, method: str, key: str, value=None):
    return DEFAULTS[method][("toy_" if training.is_toy(pipe) else "") + key] if value in (None, "") else value


def fill(template: str, token: str) -> str:
    """The caption with the token at '{}', or in front."""
    return template.replace("{}", token) if "{}" in template else f"{token} {template}".strip()


def train_concept(manager, images: list[TrainingImage], token: str, *, method: str = "lora", class_word: str = "",
                  steps: int | None = None, lr: float | None = None, token_lr: float | None = None, batch: int = 4,
                  rank: int = 4, lora_targets: str = "attention", vectors: int = 1, cross_init: bool = True,
                  cross_init_weight: float = 1e-5, semantic_weight: float = 0.0, prior_weight: float = 0.0,
                  prior_images: int = 8, prior_prompts: list[str] | None = None, templates: list[str] | None = None,
                  flip: bool = True, seed=0, gradient_checkpointing: bool = False, mixed_precision: bool = True,
                  progress: Progress | None = None, preview: Preview | None = None, preview_every: int = 100,
                  preview_prompts: list[str] | None = None, save_dir: str | Path | None = None,
                  save_every: int = 100, resume: bool = False, scope: str = "prompt", cut_mix: float = 0.0) -> Edit:
    """Train `token` on `images` into a "learned_concept" Edit (captions: an image's own, else `templates`)."""
    scope = check_scope(scope)
    if method not in METHODS:
        raise StudioError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if lora_targets not in LORA_TARGETS:
        raise StudioError(f"unknown LoRA targets {lora_targets!r}: choose one of {', '.join(LORA_TARGETS)}")
    if not images:
        raise StudioError("no training images: add 3-10 images of the concept")
    pipe = manager.pipe
    token = check_token(pipe.tokenizer, token)
    training.check_no_adapters(pipe.unet)
    class_word = str(class_word or "").strip()
    steps = whole("training steps", default(pipe, method, "steps", steps), 1, MAX_STEPS)
    lr = number("learning rate", default(pipe, method, "lr", lr), 1e-8, 1.0)
    token_lr = number("token learning rate", default(pipe, "ti", "lr", token_lr), 0, 1.0)
    batch = whole("batch size", batch, 1, 64)
    rank = whole("LoRA rank", rank, 1, 256)
    vectors = whole("vectors per token", vectors, 1, MAX_VECTORS)
    semantic_weight = number("semantic preservation weight", semantic_weight, 0, 100)
    prior_weight = number("prior preservation weight", prior_weight, 0, 100)
    cross_init_weight = number("cross-initialization weight", cross_init_weight, 0, 100)
    preview_every = whole("preview interval", preview_every, 1, MAX_STEPS)
    save_every = whole("save interval", save_every, 1, MAX_STEPS)
    seed = parse_seed(seed)
    prior_prompts = [p.strip() for p in prior_prompts or [] if p.strip()] or ([f"a {class_word}"] if class_word else [])
    if semantic_weight and not class_word:
        raise StudioError("semantic preservation needs a class word (what the concept is, e.g. 'dog')")
    cut_mix = number("Cut-Mix fraction", cut_mix, 0, 0.9)
    if (prior_weight or cut_mix) and not prior_prompts:
        raise StudioError("prior preservation and Cut-Mix need a class word or prior prompts")
    prior_images = whole("prior images", prior_images, 1, 1000)
    templates = [t for t in (templates or DEFAULT_TEMPLATES) if t.strip()]
    previews = preview_prompts or [f"a {token}"]
    settings = dict(method=method, token=token, class_word=class_word, steps=steps, lr=lr, token_lr=token_lr,
                    batch=batch, rank=rank, lora_targets=lora_targets, vectors=vectors, cross_init=bool(cross_init),
                    cross_init_weight=cross_init_weight, semantic_weight=semantic_weight, prior_weight=prior_weight,
                    prior_prompts=prior_prompts if prior_weight or cut_mix else [], seed=seed, cut_mix=cut_mix,
                    images=len(images))
    saved = training.Saved(Path(save_dir) / "state.safetensors", settings, save_every, resume) if save_dir else None
    if resume and not (saved and saved.path.is_file()):
        raise StudioError(f"nothing to resume: no saved state in {save_dir!r}")

    with manager.job(), ExitStack() as cleanup:
        if resume:
            saved.check()
        family = models.of(pipe)
        unet, device = family.denoiser, family.denoiser.device
        gen = torch.Generator("cpu").manual_seed(seed)
        rng = random.Random(seed)
        cleanup.enter_context(training.frozen(pipe))
        init = initial_vectors(pipe, class_word, vectors, cross_init)
        patch = Patch(pipe)
        cleanup.callback(patch.undo)
        ids = family.install_tokens(token, init, patch)
        token_hook = TokenHook(family.text_encoders[0].get_input_embeddings(), ids, init)
        cleanup.callback(token_hook.handle.remove)
        trainables = {"embedding": token_hook.vectors}
        if method == "custom_diffusion":  # full-rank K/V changes as forward hooks: out += x @ delta.T
            for n, m in family.text_projections().items():
                delta = torch.zeros(m.out_features, m.in_features, device=m.weight.device, requires_grad=True)
                hook = lambda _m, args, out, d=delta: out + (args[0].float() @ d.t()).to(out.dtype)  # noqa: E731
                cleanup.callback(m.register_forward_hook(hook).remove)
                trainables[f"{n}.delta"] = delta
        elif method == "lora":
            trainables.update(cleanup.enter_context(training.lora(unet, rank, lora_targets, seed)))
        if gradient_checkpointing and unet._supports_gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            cleanup.callback(unet.disable_gradient_checkpointing)
        weights = [t for n, t in trainables.items() if n != "embedding"]
        groups = [{"params": [token_hook.vectors], "lr": lr if method == "ti" else token_lr}]
        groups += [{"params": weights, "lr": lr}] if weights else []

        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        pixels = torch.stack([img.tensor for img in images])
        latents = family.encode_images(torch.cat([pixels, pixels.flip(-1)]) if flip else pixels)
        captions = [img.caption for img in images] * (2 if flip else 1)
        if prior_weight or cut_mix:
            prior, prior_texts = prior_latents(manager, prior_prompts, prior_images, seed)
        if cut_mix:
            count = round(len(latents) * cut_mix / (1 - cut_mix))
            pixels, texts = composites(pipe, images, prior, prior_texts, count, gen)
            latents = torch.cat([latents, family.encode_images(pixels)])
            captions += texts
        init_features = init.detach().float().to(device) if cross_init and class_word else None
        autocast = (torch.autocast("cuda", dtype=unet.dtype) if mixed_precision and device.type == "cuda"
                    and unet.dtype != torch.float32 else nullcontext())

        def loss(step):
            pick = torch.randint(0, len(latents), (batch,), generator=gen)
            x0 = latents[pick].to(device)
            texts = [fill(captions[i] or rng.choice(templates), token) for i in pick.tolist()]
            if prior_weight:
                which = torch.randint(0, len(prior), (batch,), generator=gen)
                x0 = torch.cat([x0, prior[which].to(device)])
                texts += [prior_texts[i] for i in which.tolist()]
            with autocast:
                err = training.diffusion_error(family, scheduler, x0, family.encode(texts), gen)
            value = err[:batch].mean()
            if prior_weight:
                value = value + prior_weight * err[batch:].mean()
            if semantic_weight:
                value = value + semantic_weight * semantic_loss(pipe, token, class_word, texts[:batch])
            if init_features is not None and cross_init_weight:
                value = value + cross_init_weight * (token_hook.vectors - init_features).pow(2).sum()
            return value

        def draw():
            return [manager.generate(GenerationRequest(p, seed=seed)).images[0] for p in previews]

        start = time.perf_counter()
        losses = training.train(manager, loss, trainables, steps, lr=lr, groups=groups, progress=progress,
                                preview=preview, draw=draw, preview_every=preview_every, saved=saved)
        tensors = training.detached(trainables)
        seconds = time.perf_counter() - start

    tail = losses[-max(1, len(losses) // 10):] or [float("nan")]
    modules = sorted({n.rsplit(".", 1)[0] for n in tensors if n != "embedding"})
    params = {**settings, "scope": scope, "strength": 1.0, "modules": modules, "base_model": base_signature(pipe),
              "train_seconds": round(seconds, 2), "final_loss": round(sum(tail) / len(tail), 5),
              "resumed_from": saved.step if saved else 0}
    return Edit("learned_concept", params, tensors, label=concept_label(params))


@torch.no_grad()
def initial_vectors(pipe, class_word: str, vectors: int, cross_init: bool) -> torch.Tensor:
    """The token's start: the class word's encoder output (Cross Initialization) or input embedding, or the mean."""
    family = models.of(pipe)
    emb = family.text_encoders[0].get_input_embeddings().weight
    ids = family.tokenizers[0](class_word, add_special_tokens=False).input_ids
    if not class_word:
        v = emb.mean(0)
    elif cross_init:
        v = family.encode([class_word]).embeds[0, 1:1 + len(ids)].mean(0)
    else:
        v = emb[ids].mean(0)
    return v.float().cpu().expand(vectors, -1).clone()


def semantic_loss(pipe, token: str, class_word: str, texts: list[str]) -> torch.Tensor:
    """ClassDiffusion's semantic preservation: 1 - cos of pooled features with the token and the class word."""
    family = models.of(pipe)
    with_token = family.encode(texts).pooled.float()
    with torch.no_grad():
        spelled = re.compile(rf"{re.escape(token)}(?:\s+{re.escape(token)}_\d+)*")
        with_class = family.encode([spelled.sub(class_word, t) for t in texts]).pooled.float()
    return (1 - F.cosine_similarity(with_token, with_class, dim=-1)).mean()


@torch.no_grad()
def composites(pipe, images: list[TrainingImage], prior: torch.Tensor, prior_texts: list[str], count: int,
               gen: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """`count` Cut-Mix pictures (SVDiff): a concept and a prior image side by side, for two-object prompts."""
    partners = models.of(pipe).decode_latents(prior).clamp(-1, 1)
    res = images[0].tensor.shape[-1]
    side = res // 2
    out, texts = [], []
    for _ in range(count):
        i, j = (int(torch.randint(0, n, (), generator=gen)) for n in (len(images), len(partners)))
        concept = images[i].tensor
        border = torch.cat([concept[:, 0], concept[:, -1], concept[:, :, 0], concept[:, :, -1]], 1)
        canvas = border.median(1).values[:, None, None].expand(3, res, res).clone()
        pair = [concept, partners[j]]
        swap, vertical = (bool(torch.rand((), generator=gen) < 0.5) for _ in range(2))
        for k, picture in enumerate(pair[::-1] if swap else pair):
            small = F.interpolate(picture[None], (side, side), mode="bilinear", antialias=True, align_corners=False)
            y, x = ((k * side, (res - side) // 2) if vertical else ((res - side) // 2, k * side))
            canvas[:, y:y + side, x:x + side] = small[0]
        out.append(canvas)
        own = images[i].caption or "a {}"
        texts.append(f"{prior_texts[j]} and {own}" if swap else f"{own} and {prior_texts[j]}")
    return torch.stack(out), texts


@torch.no_grad()
def prior_latents(manager, prompts: list[str], count: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Latents of `count` images the frozen model draws for `prompts` (cycled), and their prompts."""
    family = models.of(manager.pipe)
    texts = [prompts[i % len(prompts)] for i in range(count)]
    gen = torch.Generator("cpu").manual_seed(seed + 1)
    stop = lambda _pipe, _i, _t, kwargs: manager.check_stop() or kwargs  # noqa: E731
    out = [family.denoise(family.encode(texts[i:i + 8]), steps=20, generator=gen, output="latent", on_step=stop)
           for i in range(0, count, 8)]
    return torch.cat(out).float().cpu(), texts
