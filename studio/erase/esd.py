"""Fine-tuned erasure (ESD) trained as a LoRA adapter, applied to the model as one exact edit.

ESD (Gandikota et al., "Erasing Concepts from Diffusion Models") fine-tunes the UNet so that its
noise prediction for the concept prompt `c` points away from the concept:

    eps_theta(x_t, c, t)  ->  eps*(x_t, c, t) - eta * (eps*(x_t, c, t) - eps*(x_t, n, t))

with eps* the frozen model, `n` the empty prompt, and x_t taken from DDIM-sampling the frozen model
with `c` (guidance 3) part of the way. This is the form in METHODS.md; the paper writes the target
from eps*(x_t, "", t), so eta here is the paper's eta + 1 (eta=2 here is the paper's eta=1).

Context prompts (`concept_prompts`, e.g. "a red star" for "red") widen the erasure beyond the bare
word, as the closed-form edits' templates do; for them `n` is the prompt with the concept removed
("a star"), so the adapter learns "no red", not "no red star". On the toy model this matters: its
text encoder only ever saw captions, and an adapter trained on the bare word "red" does not reach
"a red circle"; trained on a few red star/triangle captions it erases red from circles and squares
(and the synonyms crimson/scarlet) while blue, green, yellow and purple stay.

x_t: ESD samples a fresh partial trajectory every step (`trajectories=0`), which costs on average
sample_steps/2 guided UNet calls per step. By default `trajectories` (16) full DDIM trajectories of
the frozen model are sampled once, in batches, and every step trains on random points of them:
x_t from the same distribution (from fewer noises) for a fraction of the time: the frozen model
never changes during training.

Instead of the weights, a low-rank adapter (rank 1-4) is trained, as SPM does: ESD-x on the
cross-attention projections (attn2 to_q/to_k/to_v/to_out.0), ESD-x-kv on its keys and values only
(they read only the text, so other prompts are touched least), ESD-u on everything else in the
transformer blocks (attn1 and feed-forward linears). The adapter lives in forward hooks on the
nn.Linear modules (`out += x @ A.T @ B.T`, A small random, B zero), so no parameter name changes,
nothing is written into the model while training, and removing the hooks restores it exactly.
The trained adapter is returned as an Edit of kind "esd_lora": applying it merges
`W + strength * B @ A` into each weight through the edit stack (exact undo/redo, savable,
re-appliable from its tensors).

    edit = train_esd(manager, "red", concept_prompts=["a red star", "a red triangle"])
    manager.apply(edit)                          # one entry in the history
    manager.apply(with_strength(edit, 0.5))      # the same adapter at half strength

Learning rate (`lr=None` takes suggested_lr: TOY_LR for toy-size models, SD_LR otherwise). The
published 5e-5 is for full-weight ESD; a zero-initialised LoRA barely moves at it. Measured on the
toy model (CPU, 8 red star/triangle captions as concept_prompts, presence by the oracle on the
held-out "a red circle"/"a red square", 4 seeds x 10 steps): with the defaults and lr 1e-2, red
went from 100% to 6%, crimson/scarlet from 100% to 0%, while blue, green, yellow, purple and
orange stayed at 100%; at 3e-3 or 1e-3 the adapter fits the trained prompts (residual 0.1-0.3)
yet red stays at 70-100% on the unseen ones. So `residual` (the ESD loss over its untrained value,
last 10% of steps, in the edit's params with `residual_curve`) says whether the trained prompts
are fitted, not whether the erasure generalises: judge by the previews and the oracle. Training at
1e-2 is noisy (a 60-step, 10-sampling-step run erased nothing where 40- and 200-step runs did).
SD_LR (5e-4) is a usual LoRA rate for SD-scale models, not measured here.
"""
from __future__ import annotations

import math
import re
import time
from typing import Callable

import torch
from diffusers import DDIMScheduler
from torch import nn

from ..edits import Edit, edit_kind
from ..errors import StudioError
from ..generation import parse_seed
from .text import encode

METHODS = {
    "esd-x": "cross-attention (attn2 q, k, v, out)",
    "esd-x-kv": "cross-attention keys and values only (attn2 k, v)",
    "esd-u": "everything but cross-attention (attn1 and feed-forward linears)",
}
METHOD_TITLES = {"esd-x": "ESD-x", "esd-x-kv": "ESD-x (K/V)", "esd-u": "ESD-u"}
PUBLISHED_LR = 5e-5  # full-weight ESD on SD-1.x
TOY_LR = 1e-2  # LoRA on the bundled toy model (measured, see the module notes)
SD_LR = 5e-4  # LoRA on SD-scale models: a usual LoRA rate, not measured here (no SD weights offline)
MAX_RANK = 4
MAX_STEPS = 5000
DEFAULT_PREVIEW_EVERY = 50
DEFAULT_TRAJECTORIES = 16
PREVIEW_GUIDANCE = 7.5

Progress = Callable[[int, int], None]
Preview = Callable[[int, list], None]


# -- which modules ----------------------------------------------------------------------------
def target_modules(unet: nn.Module, method: str) -> dict[str, nn.Linear]:
    """The nn.Linear modules of `unet` that `method` trains, by their weight's pipeline name."""
    out = {}
    for name, module in unet.named_modules():
        if not isinstance(module, nn.Linear) or ".transformer_blocks." not in f".{name}":
            continue
        parts = name.split(".")
        cross = "attn2" in parts
        if method == "esd-x":
            keep = cross and (parts[-1] in ("to_q", "to_k", "to_v") or parts[-2:] == ["to_out", "0"])
        elif method == "esd-x-kv":
            keep = cross and parts[-1] in ("to_k", "to_v")
        else:  # esd-u
            keep = not cross and ("attn1" in parts or "ff" in parts)
        if keep:
            out[f"unet.{name}.weight"] = module
    return out


# -- the adapter as forward hooks ---------------------------------------------------------------
class LoraHooks:
    """A LoRA on each given Linear, as forward hooks: out += x @ A.T @ B.T (A small random, B zero).

    `enabled = False` gives the frozen model. `remove()` takes every hook off; the modules' own
    parameters are never touched."""

    def __init__(self, modules: dict[str, nn.Linear], rank: int, generator: torch.Generator, device):
        self.enabled = False
        self.A: dict[str, torch.Tensor] = {}
        self.B: dict[str, torch.Tensor] = {}
        self._handles = []
        try:
            for name, module in modules.items():
                a = torch.randn(rank, module.in_features, generator=generator) / math.sqrt(module.in_features)
                self.A[name] = a.to(device).requires_grad_(True)
                self.B[name] = torch.zeros(module.out_features, rank, device=device, requires_grad=True)
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self.remove()
            raise

    def _hook(self, name: str):
        def hook(module, args, output):
            if not self.enabled:
                return None
            x = args[0]
            delta = (x.float() @ self.A[name].t()) @ self.B[name].t()
            return output + delta.to(output.dtype)
        return hook

    def parameters(self) -> list[torch.Tensor]:
        return [*self.A.values(), *self.B.values()]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


# -- sampling with the (frozen or adapted) model --------------------------------------------------
def _encode(pipe, prompts: list[str]) -> torch.Tensor:
    return encode(pipe, prompts).to(pipe.unet.dtype)


def _eps(unet, x, t, cond) -> torch.Tensor:
    t = torch.as_tensor(t, device=x.device)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    return unet(x.to(unet.dtype), t, encoder_hidden_states=cond).sample.float()


@torch.no_grad()
def _ddim_step(unet, scheduler, latents, i: int, cond, uncond, guidance: float) -> torch.Tensor:
    """Step i of the scheduler's (already set) DDIM schedule, with classifier-free guidance."""
    b, t = latents.shape[0], scheduler.timesteps[i]
    both = _eps(unet, torch.cat([latents, latents]).to(unet.dtype), t,
                torch.cat([uncond.expand(b, -1, -1), cond.expand(b, -1, -1)]))
    u, c = both.chunk(2)
    return scheduler.step(u + guidance * (c - u), t, latents.float()).prev_sample


def _ddim(unet, scheduler, latents, cond, uncond, n: int, guidance: float, check=None) -> torch.Tensor:
    """Run the first `n` steps of the DDIM schedule."""
    for i in range(n):
        if check:
            check()
        latents = _ddim_step(unet, scheduler, latents, i, cond, uncond, guidance)
    return latents


def _trajectory(unet, scheduler, latents, cond, uncond, guidance: float, check=None) -> torch.Tensor:
    """The latents before each step of the whole DDIM schedule: [batch, steps, C, H, W], on CPU."""
    out = []
    for i in range(len(scheduler.timesteps)):
        if check:
            check()
        out.append(latents.cpu())
        if i + 1 < len(scheduler.timesteps):
            latents = _ddim_step(unet, scheduler, latents, i, cond, uncond, guidance)
    return torch.stack(out, 1)


def _noise(pipe, batch: int, generator: torch.Generator) -> torch.Tensor:
    c, s = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    return torch.randn(batch, c, s, s, generator=generator).to(pipe.unet.device)


@torch.no_grad()
def _decode(pipe, latents) -> list:
    image = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(image.float(), output_type="pil")


def neutral_prompt(prompt: str, concept: str) -> str:
    """`prompt` without the concept ("a red star" -> "a star"): the reference ESD steers away toward.

    For the bare concept this is the empty prompt, which is ESD as published; for a context prompt
    it keeps the context, so "a red star" teaches "no red" rather than "no red star". A prompt that
    does not contain the concept word (a paraphrase) is steered toward the empty prompt."""
    rx = re.compile(rf"(?<!\w){re.escape(concept)}(?!\w)", re.IGNORECASE)
    if prompt.strip().lower() == concept.lower() or not rx.search(prompt):
        return ""
    out = " ".join(rx.sub(" ", prompt).split())
    out = re.sub(r"\b([Aa])n?\s+(?=(\w))", lambda m: m.group(1) + ("n " if m.group(2).lower() in "aeiou" else " "), out)
    return out


# -- validation ---------------------------------------------------------------------------------
def _number(name: str, v, lo: float, hi: float, lo_open: bool = False) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise StudioError(f"{name} must be a number (got {v!r})") from None
    if not math.isfinite(f) or f < lo or f > hi or (lo_open and f == lo):
        lower = f"above {lo:g}" if lo_open else f"from {lo:g}"
        raise StudioError(f"{name} must be a number {lower} up to {hi:g} (got {v!r})")
    return f


def _whole(name: str, v, lo: int, hi: int) -> int:
    try:
        f = float(v)
        if f != int(f):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise StudioError(f"{name} must be a whole number from {lo} to {hi} (got {v!r})") from None
    if not lo <= int(f) <= hi:
        raise StudioError(f"{name} must be from {lo} to {hi} (got {v!r})")
    return int(f)


def _prompt_list(prompts) -> list[str]:
    """A list of prompts from a list or from text with one prompt a line (a UI textbox)."""
    if isinstance(prompts, str):
        prompts = prompts.splitlines()
    out = []
    for p in prompts or []:
        p = str(p).strip()
        if p and p not in out:
            out.append(p)
    return out


def _check_method(method) -> str:
    m = str(method or "").strip().lower()
    if m not in METHODS:
        raise StudioError(f"unknown ESD method {method!r}; choose one of: "
                          + "; ".join(f"{k} ({v})" for k, v in METHODS.items()))
    return m


def suggested_lr(pipe) -> float:
    """The UI's default learning rate for this model: TOY_LR for toy-sized models, SD_LR otherwise."""
    return TOY_LR if pipe.unet.config.cross_attention_dim < 512 else SD_LR


def esd_label(concept: str, method: str, rank: int, strength: float = 1.0) -> str:
    label = f"{METHOD_TITLES.get(method, method)} erase {concept!r} (LoRA r{rank})"
    return label if strength == 1.0 else f"{label} x{strength:g}"


# -- training -----------------------------------------------------------------------------------
def train_esd(manager, concept: str, *, method: str = "esd-x", rank: int = 2, steps: int = 200,
              lr: float | None = None, eta: float = 2.0, anchor_weight: float = 0.0,
              anchor_prompts: list[str] | None = None, seed=0, progress: Progress | None = None,
              preview: Preview | None = None, preview_every: int = DEFAULT_PREVIEW_EVERY,
              preview_seeds: int = 2, sample_steps: int = 50, guidance: float = 3.0, batch: int = 1,
              trajectories: int | None = DEFAULT_TRAJECTORIES, concept_prompts: list[str] | None = None) -> Edit:
    """Train an ESD erasure of `concept` as a LoRA and return it as an "esd_lora" Edit (not applied).

    Each step takes x_t on the frozen model's DDIM trajectories (guidance `guidance`, `sample_steps`
    steps) for the concept prompt or one of `concept_prompts`, and regresses the adapted model's
    prediction for that prompt onto eps*(c) - eta * (eps*(c) - eps*(neutral)), `batch` points at a
    time, with Adam at `lr` (None: suggested_lr, by model size). `trajectories` > 0 samples that many trajectories once up front;
    0 samples a fresh partial one every step (as published; slower). With `anchor_weight` > 0 the
    adapted model's predictions for `anchor_prompts` (default: random-token prompts, fresh each
    step) are also pulled toward the frozen model's on the same x_t, limiting collateral damage.

    `progress(done, total)` is called after every batched sampling step of the trajectories and
    every training step (total = their sum), `preview(step, images)` every `preview_every` training
    steps (and at the end) with `preview_seeds` images from the adapted model (image i shows
    prompt i of [concept, *concept_prompts]). The whole run holds the manager's job lock; a stop
    request raises JobStopped and, since the adapter only ever lives in hooks, leaves the model
    exactly as it was. Bad settings raise StudioError before anything runs.
    """
    concept = str(concept or "").strip()
    if not concept:
        raise StudioError("the concept to erase is empty: type the word or phrase to erase (e.g. 'red')")
    method = _check_method(method)
    rank = _whole("LoRA rank", rank, 1, MAX_RANK)
    steps = _whole("training steps", steps, 1, MAX_STEPS)
    lr = None if lr is None else _number("learning rate", lr, 0.0, 1.0, lo_open=True)
    eta = _number("eta (negative guidance)", eta, 0.0, 20.0)
    anchor_weight = _number("anchor weight", anchor_weight, 0.0, 1000.0)
    sample_steps = _whole("sampling steps", sample_steps, 1, 200)
    guidance = _number("sampling guidance", guidance, 0.0, 50.0)
    batch = _whole("batch size", batch, 1, 16)
    trajectories = _whole("trajectories", trajectories or 0, 0, 256)
    preview_every = _whole("preview interval", preview_every, 1, MAX_STEPS)
    preview_seeds = _whole("preview images", preview_seeds, 1, 8)
    seed = parse_seed(seed)
    anchors = _prompt_list(anchor_prompts)
    prompts = [concept] + [p for p in _prompt_list(concept_prompts) if p != concept]

    with manager.job():
        pipe = manager.pipe
        unet, device = pipe.unet, pipe.unet.device
        lr = suggested_lr(pipe) if lr is None else lr
        modules = target_modules(unet, method)
        if not modules:
            raise StudioError(f"this model's UNet has no layers for {method} ({METHODS[method]})")
        gen = torch.Generator("cpu").manual_seed(seed)
        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(sample_steps)
        timesteps = scheduler.timesteps.to(device)
        prompt_embeds, uncond = _encode(pipe, prompts), _encode(pipe, [""])
        neutral_embeds = _encode(pipe, [neutral_prompt(p, concept) for p in prompts])
        preview_cond = prompt_embeds[torch.arange(preview_seeds) % len(prompts)]  # image i shows prompt i
        fixed_anchors = _encode(pipe, anchors) if anchors else None

        grad_flags = [(p, p.requires_grad) for p in unet.parameters()]
        hooks = None
        try:
            for p, _ in grad_flags:
                p.requires_grad_(False)
            hooks = LoraHooks(modules, rank, gen, device)
            opt = torch.optim.Adam(hooks.parameters(), lr=lr)
            preview_noise = _noise(pipe, preview_seeds, torch.Generator("cpu").manual_seed(seed))
            start = time.perf_counter()
            # progress counts the batched sampling steps of the trajectories, then the training steps
            sampling = math.ceil(trajectories / 8) * sample_steps
            total, ticks = sampling + steps, [0]

            def tick():
                manager.check_stop()
                ticks[0] += 1
                if progress and ticks[0] <= sampling:
                    progress(ticks[0], total)

            pool = None
            if trajectories:  # the frozen model's DDIM trajectories for the concept, sampled once
                pool_prompt = torch.arange(trajectories) % len(prompts)
                pool = torch.cat([_trajectory(unet, scheduler, _noise(pipe, min(8, trajectories - i), gen),
                                              prompt_embeds[pool_prompt[i:i + 8]], uncond, guidance, tick)
                                  for i in range(0, trajectories, 8)])
            ratios = []
            for step in range(steps):
                manager.check_stop()
                hooks.enabled = False
                if pool is not None:  # x_t: a random point of a random trajectory
                    n = torch.randint(0, sample_steps, (batch,), generator=gen)
                    j = torch.randint(0, len(pool), (batch,), generator=gen)
                    pi = pool_prompt[j]
                    x = pool[j, n].to(device)
                else:  # x_t: a fresh trajectory of the frozen model, run part of the way (as published)
                    n = torch.randint(0, sample_steps, (1,), generator=gen).expand(batch)
                    pi = torch.randint(0, len(prompts), (batch,), generator=gen)
                    x = _ddim(unet, scheduler, _noise(pipe, batch, gen), prompt_embeds[pi], uncond, int(n[0]),
                              guidance, manager.check_stop)
                t = timesteps[n.to(device)]
                anchor = None
                if anchor_weight > 0:
                    anchor = (fixed_anchors[torch.randint(0, len(fixed_anchors), (batch,), generator=gen)]
                              if fixed_anchors is not None else _random_prompt_embeddings(pipe, batch, gen))
                conds = [prompt_embeds[pi], neutral_embeds[pi]] + ([anchor] if anchor is not None else [])
                with torch.no_grad():
                    frozen = _eps(unet, x.repeat(len(conds), 1, 1, 1), t.repeat(len(conds)),
                                  torch.cat(conds)).chunk(len(conds))
                    e_c, e_0 = frozen[0], frozen[1]
                    target = e_c - eta * (e_c - e_0)
                hooks.enabled = True
                trained = [conds[0]] + ([anchor] if anchor is not None else [])
                pred = _eps(unet, x.repeat(len(trained), 1, 1, 1), t.repeat(len(trained)),
                            torch.cat(trained)).chunk(len(trained))
                erase_loss = nn.functional.mse_loss(pred[0], target)
                loss = erase_loss
                if anchor is not None:
                    loss = loss + anchor_weight * nn.functional.mse_loss(pred[1], frozen[2])
                if not torch.isfinite(loss):
                    raise StudioError(f"ESD training diverged at step {step + 1} (loss {float(loss)}): "
                                      f"lower the learning rate (now {lr:g})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    ratios.append(float(erase_loss / nn.functional.mse_loss(e_c, target).clamp_min(1e-12)))
                done = step + 1
                if progress:
                    progress(sampling + done, total)
                if preview and (done % preview_every == 0 or done == steps):
                    manager.check_stop()
                    with torch.no_grad():
                        latents = _ddim(unet, scheduler, preview_noise.clone(), preview_cond, uncond, sample_steps,
                                        PREVIEW_GUIDANCE, manager.check_stop)
                        images = _decode(pipe, latents)
                    preview(done, images)
            seconds = time.perf_counter() - start
            tensors = {}
            for name in modules:
                tensors[f"{name}.lora_A"] = hooks.A[name].detach().float().cpu().contiguous()
                tensors[f"{name}.lora_B"] = hooks.B[name].detach().float().cpu().contiguous()
        finally:
            if hooks is not None:
                hooks.enabled = False
                hooks.remove()
            for p, flag in grad_flags:
                p.requires_grad_(flag)

    every = max(1, steps // 20)
    curve = [round(sum(ratios[i:i + every]) / len(ratios[i:i + every]), 3) for i in range(0, steps, every)]
    tail = ratios[-max(1, steps // 10):]
    params = dict(concept=concept, method=method, rank=rank, steps=steps, lr=lr, eta=eta,
                  concept_prompts=prompts[1:], anchor_weight=anchor_weight, anchor_prompts=anchors, seed=seed,
                  sample_steps=sample_steps, guidance=guidance, batch=batch, trajectories=trajectories,
                  strength=1.0, modules=list(modules),
                  train_seconds=round(seconds, 2), residual=round(sum(tail) / len(tail), 4), residual_curve=curve)
    return Edit("esd_lora", params, tensors, label=esd_label(concept, method, rank))


def _random_prompt_embeddings(pipe, batch: int, gen: torch.Generator) -> torch.Tensor:
    """Text-encoder outputs for prompts of 1-5 random vocabulary tokens ('other' embeddings for anchoring)."""
    tok = pipe.tokenizer
    special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    rows = []
    for _ in range(batch):
        n = int(torch.randint(1, 6, (1,), generator=gen))
        ids = [i for i in torch.randint(0, len(tok), (n * 2,), generator=gen).tolist() if i not in special][:n]
        ids = [tok.bos_token_id, *ids, tok.eos_token_id]
        rows.append(ids + [tok.pad_token_id] * (tok.model_max_length - len(ids)))
    with torch.no_grad():
        return pipe.text_encoder(torch.tensor(rows, device=pipe.text_encoder.device))[0].to(pipe.unet.dtype)


# -- the edit -----------------------------------------------------------------------------------
def with_strength(edit: Edit, strength: float) -> Edit:
    """The same adapter at another strength (a new Edit sharing the tensors)."""
    if edit.kind != "esd_lora":
        raise StudioError(f"{edit.title} is not an ESD adapter (kind {edit.kind!r})")
    s = _number("strength", strength, -10.0, 10.0)
    p = edit.params
    return Edit(edit.kind, {**p, "strength": s}, edit.tensors,
                label=esd_label(p.get("concept", "?"), p.get("method", "esd"), p.get("rank", 0), s))


@edit_kind("esd_lora")
def apply_esd_lora(pipe, params: dict, tensors: dict, patch) -> None:
    """Merge each adapter into its weight: W + strength * B @ A (computed in fp32)."""
    strength = params.get("strength", 1.0)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
            or abs(strength) > 10:
        raise StudioError(f"adapter strength must be a finite number from -10 to 10 (got {strength!r})")
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
