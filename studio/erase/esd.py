"""Fine-tuned erasure (ESD, Gandikota et al.) trained as a LoRA adapter, applied as one exact "esd_lora" edit.

The adapter regresses eps(x_t, c) onto eps*(c) - eta * (eps*(c) - eps*(n)) (eps*: the frozen model, x_t on its DDIM
trajectories for c), n being the prompt without the concept ("a red star" -> "a star": it learns "no red").
A zero-initialised LoRA barely moves at the published full-weight lr 5e-5; on the toy model 1e-2 erased unseen red
(1e-3 fit the trained prompts yet left it): judge by the previews and the oracle, not by `residual`.
"""
from __future__ import annotations

import math
import re
import time

import torch
from diffusers import DDIMScheduler
from torch import nn

from .. import models, training
from ..checks import number, whole
from ..edits import Edit, edit_kind
from ..errors import StudioError
from ..generation import parse_seed
from ..models import Conditioning
from ..training import Preview, Progress, is_toy
from .text import encode

METHODS = {
    "esd-x": "cross-attention (attn2 q, k, v, out)",
    "esd-x-kv": "cross-attention keys and values only (attn2 k, v)",
    "esd-u": "everything but cross-attention (attn1 and feed-forward linears)",
}
METHOD_TITLES = {"esd-x": "ESD-x", "esd-x-kv": "ESD-x (K/V)", "esd-u": "ESD-u"}
PUBLISHED_LR = 5e-5  # full-weight ESD on SD-1.x
TOY_LR = 1e-2  # LoRA on the bundled toy model (measured)
SD_LR = 5e-4  # LoRA on SD-scale models (no SD weights offline to measure on)
MAX_RANK = 4
MAX_STEPS = 5000

LAYERS = {"esd-x": r"\.attn2\.(to_[qkv]|to_out\.0)$", "esd-x-kv": r"\.attn2\.to_[kv]$", "esd-u": r"\.(attn1|ff)\."}


def target_modules(unet: nn.Module, method: str) -> dict[str, nn.Linear]:
    """The transformer-block linears `method` trains, by their weight's pipeline name."""
    return {f"unet.{n}.weight": m for n, m in unet.named_modules() if isinstance(m, nn.Linear)
            and ".transformer_blocks." in f".{n}" and re.search(LAYERS[method], n)}


def _noise(family, batch: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(batch, *family.latent_shape(family.default_size, family.default_size), generator=generator)
    return x.to(family.denoiser.device, family.denoiser.dtype)


def _trajectory(family, ddim, noise, cond, guidance: float, tick) -> torch.Tensor:
    """The latents before each step of the frozen model's DDIM schedule: [batch, steps, C, H, W], on CPU."""
    out = [noise.cpu()]
    tick()

    def keep(pipe, i, t, kwargs):
        tick()
        out.append(kwargs["latents"].cpu())
        return kwargs

    family.denoise(Conditioning(cond), steps=len(ddim.timesteps), guidance=guidance, scheduler=ddim, latents=noise,
                   on_step=keep, stop_after=len(ddim.timesteps) - 1, output="latent")
    return torch.stack(out, 1)


def neutral_prompt(prompt: str, concept: str) -> str:
    """`prompt` without the concept ("a red star" -> "a star"); "" for the bare concept or a paraphrase."""
    rx = re.compile(rf"(?<!\w){re.escape(concept)}(?!\w)", re.IGNORECASE)
    if prompt.strip().lower() == concept.lower() or not rx.search(prompt):
        return ""
    out = " ".join(rx.sub(" ", prompt).split())
    article = lambda m: m.group(1) + ("n " if m.group(2).lower() in "aeiou" else " ")  # noqa: E731
    return re.sub(r"\b([Aa])n?\s+(?=(\w))", article, out)


def _prompt_list(prompts) -> list[str]:
    """Prompts from a list or from text with one a line (a UI textbox), stripped, without repeats."""
    lines = prompts.splitlines() if isinstance(prompts, str) else prompts or []
    return list(dict.fromkeys(p for p in (str(p).strip() for p in lines) if p))


def suggested_lr(pipe) -> float:
    return TOY_LR if is_toy(pipe) else SD_LR


def esd_label(concept: str, method: str, rank: int, strength: float = 1.0) -> str:
    label = f"{METHOD_TITLES.get(method, method)} erase {concept!r} (LoRA r{rank})"
    return label if strength == 1.0 else f"{label} x{strength:g}"


def train_esd(manager, concept: str, *, method: str = "esd-x", rank: int = 2, steps: int = 200,
              lr: float | None = None, eta: float = 2.0, anchor_weight: float = 0.0,
              anchor_prompts: list[str] | None = None, seed=0, progress: Progress | None = None,
              preview: Preview | None = None, preview_every: int = 50,
              preview_seeds: int = 2, sample_steps: int = 50, guidance: float = 3.0, batch: int = 1,
              trajectories: int | None = 16, concept_prompts: list[str] | None = None) -> Edit:
    """Train an ESD erasure of `concept` as a LoRA; return the "esd_lora" Edit, not applied. `anchor_weight` > 0
    pulls `anchor_prompts` (default: fresh random-token prompts) toward the frozen model; preview image i shows
    prompt i of [concept, *concept_prompts]. Bad settings fail before anything runs; a stop changes nothing."""
    concept = str(concept or "").strip()
    if not concept:
        raise StudioError("the concept to erase is empty: type the word or phrase to erase (e.g. 'red')")
    method = str(method or "").strip().lower()
    if method not in METHODS:
        raise StudioError(f"unknown ESD method {method!r}; choose one of: "
                          + "; ".join(f"{k} ({v})" for k, v in METHODS.items()))
    rank = whole("LoRA rank", rank, 1, MAX_RANK)
    steps = whole("training steps", steps, 1, MAX_STEPS)
    lr = None if lr is None else number("learning rate", lr, 0.0, 1.0, lo_open=True)
    eta = number("eta (negative guidance)", eta, 0.0, 20.0)
    anchor_weight = number("anchor weight", anchor_weight, 0.0, 1000.0)
    sample_steps = whole("sampling steps", sample_steps, 1, 200)
    guidance = number("sampling guidance", guidance, 0.0, 50.0)
    batch = whole("batch size", batch, 1, 16)
    trajectories = whole("trajectories", trajectories or 0, 0, 256)
    preview_every = whole("preview interval", preview_every, 1, MAX_STEPS)
    preview_seeds = whole("preview images", preview_seeds, 1, 8)
    seed = parse_seed(seed)
    anchors = _prompt_list(anchor_prompts)
    prompts = [concept] + [p for p in _prompt_list(concept_prompts) if p != concept]

    with manager.job():
        pipe = manager.pipe
        family = models.of(pipe)
        unet, device = family.denoiser, family.denoiser.device
        lr = suggested_lr(pipe) if lr is None else lr
        modules = target_modules(unet, method)
        if not modules:
            raise StudioError(f"this model's UNet has no layers for {method} ({METHODS[method]})")
        gen = torch.Generator("cpu").manual_seed(seed)
        init = {n: torch.randn(rank, m.in_features, generator=gen) / math.sqrt(m.in_features) for n, m in modules.items()}
        ddim = DDIMScheduler.from_config(pipe.scheduler.config)
        ddim.set_timesteps(sample_steps)
        timesteps = ddim.timesteps.to(device)
        prompt_embeds = encode(pipe, prompts)
        neutral_embeds = encode(pipe, [neutral_prompt(p, concept) for p in prompts])
        preview_cond = Conditioning(prompt_embeds[torch.arange(preview_seeds) % len(prompts)])  # image i: prompt i
        fixed_anchors = encode(pipe, anchors) if anchors else None
        preview_noise = _noise(family, preview_seeds, torch.Generator("cpu").manual_seed(seed))
        names = [n.removeprefix("unet.").removesuffix(".weight") for n in modules]
        sampling = math.ceil(trajectories / 8) * sample_steps  # trajectories are sampled 8 at a time
        total, ticks = sampling + steps, [0]

        def tick():
            manager.check_stop()
            ticks[0] += 1
            if progress:
                progress(ticks[0], total)

        def check(pipe, i, t, kwargs):
            manager.check_stop()
            return kwargs

        def eps(x, t, conds: list) -> tuple:
            k = len(conds)
            return family.predict(x.repeat(k, 1, 1, 1), t.repeat(k), Conditioning(torch.cat(conds))).float().chunk(k)

        def loss(step):
            with torch.no_grad(), training.adapters_off(unet):
                if pool is not None:  # x_t: a random point of a random trajectory
                    n = torch.randint(0, sample_steps, (batch,), generator=gen)
                    j = torch.randint(0, len(pool), (batch,), generator=gen)
                    pi = pool_prompt[j]
                    x = pool[j, n].to(device)
                else:  # x_t: a fresh trajectory of the frozen model, run part of the way (as published)
                    n = torch.randint(0, sample_steps, (1,), generator=gen).expand(batch)
                    pi = torch.randint(0, len(prompts), (batch,), generator=gen)
                    x = family.denoise(Conditioning(prompt_embeds[pi]), steps=sample_steps, guidance=guidance,
                                       scheduler=ddim, latents=_noise(family, batch, gen), on_step=check,
                                       stop_after=int(n[0]), output="latent")
                t, anchor = timesteps[n.to(device)], []
                if anchor_weight > 0:  # other prompts, pulled toward the frozen model on the same x_t
                    anchor = [fixed_anchors[torch.randint(0, len(fixed_anchors), (batch,), generator=gen)]
                              if fixed_anchors is not None else _random_prompt_embeddings(family, batch, gen)]
                frozen = eps(x, t, [prompt_embeds[pi], neutral_embeds[pi], *anchor])
                target = frozen[0] - eta * (frozen[0] - frozen[1])
            pred = eps(x, t, [prompt_embeds[pi], *anchor])
            erase_loss = nn.functional.mse_loss(pred[0], target)
            ratios.append(float(erase_loss.detach() / nn.functional.mse_loss(frozen[0], target).clamp_min(1e-12)))
            return erase_loss + (anchor_weight * nn.functional.mse_loss(pred[1], frozen[2]) if anchor else 0)

        def draw():
            return family.denoise(preview_cond, steps=sample_steps, guidance=7.5, scheduler=ddim,
                                  latents=preview_noise.clone(), on_step=check)

        with training.frozen(pipe, train_mode=False), training.lora(unet, rank, names, seed, init=init) as factors:
            start, pool, ratios = time.perf_counter(), None, []
            if trajectories:  # the frozen model's DDIM trajectories for the concept, sampled once
                pool_prompt = torch.arange(trajectories) % len(prompts)
                with training.adapters_off(unet):
                    pool = torch.cat([_trajectory(family, ddim, _noise(family, min(8, trajectories - i), gen),
                                                  prompt_embeds[pool_prompt[i:i + 8]], guidance, tick)
                                      for i in range(0, trajectories, 8)])
            training.train(manager, loss, factors, steps, lr=lr, what="ESD training",
                           progress=progress and (lambda done, _: progress(sampling + done, total)),
                           preview=preview, draw=draw, preview_every=preview_every)
            seconds = time.perf_counter() - start
            tensors = training.detached(factors)

    every = max(1, steps // 20)
    curve = [round(sum(ratios[i:i + every]) / len(ratios[i:i + every]), 3) for i in range(0, steps, every)]
    tail = ratios[-max(1, steps // 10):]
    params = dict(concept=concept, method=method, rank=rank, steps=steps, lr=lr, eta=eta,
                  concept_prompts=prompts[1:], anchor_weight=anchor_weight, anchor_prompts=anchors, seed=seed,
                  sample_steps=sample_steps, guidance=guidance, batch=batch, trajectories=trajectories,
                  strength=1.0, modules=list(modules),
                  train_seconds=round(seconds, 2), residual=round(sum(tail) / len(tail), 4), residual_curve=curve)
    return Edit("esd_lora", params, tensors, label=esd_label(concept, method, rank))


def _random_prompt_embeddings(family, batch: int, gen: torch.Generator) -> torch.Tensor:
    """Text-encoder outputs (under the caller's no_grad) for prompts of 1-5 random vocabulary tokens."""
    tok = family.tokenizers[0]
    special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    rows = []
    for _ in range(batch):
        n = int(torch.randint(1, 6, (1,), generator=gen))
        ids = [i for i in torch.randint(0, len(tok), (n * 2,), generator=gen).tolist() if i not in special][:n]
        ids = [tok.bos_token_id, *ids, tok.eos_token_id]
        rows.append(ids + [tok.pad_token_id] * (tok.model_max_length - len(ids)))
    return family.encode([], ids=torch.tensor(rows, device=family.text_encoders[0].device)).embeds.float()


def with_strength(edit: Edit, strength: float) -> Edit:
    """The same adapter at another strength (a new Edit, the same tensors)."""
    if edit.kind != "esd_lora":
        raise StudioError(f"{edit.title} is not an ESD adapter (kind {edit.kind!r})")
    s = number("strength", strength, -10.0, 10.0)
    p = edit.params
    return Edit(edit.kind, {**p, "strength": s}, edit.tensors,
                label=esd_label(p.get("concept", "?"), p.get("method", "esd"), p.get("rank", 0), s))


@edit_kind("esd_lora")
def apply_esd_lora(pipe, params: dict, tensors: dict, patch) -> None:
    """Merge each adapter into its weight: W + strength * B @ A (computed in fp32)."""
    strength = number("adapter strength", params.get("strength", 1.0), -10, 10)
    names = params.get("modules")
    if not isinstance(names, list) or not names:
        raise StudioError("this ESD edit lists no layers: it is damaged; train it again")
    for name in names:
        a, b = tensors.get(f"{name}.lora_A"), tensors.get(f"{name}.lora_B")
        if a is None or b is None:
            raise StudioError(f"this ESD edit lacks the adapter tensors for {name}: it is damaged; train it again")
        w = patch.read(name)
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise StudioError(f"{name}: adapter shapes {tuple(b.shape)} x {tuple(a.shape)} do not fit the weight "
                              f"{tuple(w.shape)} (an adapter trained on another architecture?)")
        delta = b.to(w.device, torch.float32) @ a.to(w.device, torch.float32)
        patch.write(name, w.float() + float(strength) * delta)
