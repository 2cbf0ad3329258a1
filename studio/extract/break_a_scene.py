"""Break-A-Scene: learn one token per masked object of a single image.

Phase 1 trains only the tokens (high learning rate), phase 2 the tokens and a LoRA on the UNet
(the published method tunes the whole UNet; a LoRA fits small GPUs). Every step samples a random
subset of the concepts ("union sampling"), captions it "a <a> and a <b>", and uses
- the diffusion loss only inside the union of the sampled concepts' masks (by default also over the
  pixels no mask claims, so that "a <a>" alone learns an empty background instead of leaving it to
  the prior, which on the toy model added stray objects), and
- optionally ("isolate", our addition for single-image overfitting) each subset is shown its own
  picture, the other objects painted over with the background, and the loss covers all of it;
- a cross-attention loss pulling each sampled token's attention map (mean over heads and layers at
  16x16, or the finest resolution below that, divided by its peak) toward its mask (weight 1e-2).
The result is one "learned_concept" edit holding every token (params "token" + "more_tokens").
Training leaves the model untouched; stop or error leaves model and history as they were.
"""
from __future__ import annotations

import time
from contextlib import ExitStack

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from ..attention.capture import attention_probs, cross_attention_resolutions, project_qk
from ..customize.concept import base_signature, check_token, concept_label, install_tokens
from ..customize.images import TrainingImage
from ..customize.train import (ADAPTER, LORA_TARGETS, TokenHook, _ids, _number, _target, _whole, add_lora,
                               check_no_adapters,
                               encode_images, initial_vectors, is_toy, remove_lora)
from ..edits import Edit, Patch
from ..errors import StudioError
from ..generation import GenerationRequest, parse_seed

# published: phase 1 lr 5e-4 (tokens), phase 2 lr 2e-6 (full UNet + tokens); with a LoRA we use 1e-4.
# Toy model: attention weight 0.1 (bench_extract, scene 11: the second token's shape 38% -> 100% vs 1e-2)
DEFAULTS = dict(steps_tokens=400, steps_joint=400, lr_tokens=5e-4, lr_joint=1e-4, toy_lr_tokens=5e-3,
                toy_lr_joint=1e-3, toy_steps_tokens=150, toy_steps_joint=350, attention_weight=1e-2,
                toy_attention_weight=0.1)


def caption(tokens: list[str]) -> str:
    return "a " + " and a ".join(tokens)


class CrossAttentionMaps:
    """Forward pre-hooks on the cross-attention layers of one resolution that keep, with gradients,
    their attention probabilities (mean over heads): (B, N, 77) per layer, for the attention loss."""

    def __init__(self, unet, resolution: int):
        self.maps: list[torch.Tensor] = []
        self.handles = []
        self.resolution = resolution
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                self.handles.append(module.register_forward_pre_hook(self._hook, with_kwargs=True))

    def _hook(self, attn, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] == self.resolution ** 2:
            q, k = project_qk(attn, hidden, kwargs.get("encoder_hidden_states"))
            self.maps.append(attention_probs(attn, q, k).mean(1))

    def remove(self):
        for h in self.handles:
            h.remove()


def attention_loss(probs: torch.Tensor, positions: list[list[torch.Tensor]], masks: list[torch.Tensor]):
    """Break-A-Scene's cross-attention loss: per image b and sampled concept j, the MSE between the
    concept's token map (probs[b, :, its positions], averaged, divided by its peak) and its mask.
    probs: (B, h*w, tokens); positions[b][j]: token positions; masks[b][j]: (h, w)."""
    total = probs.new_zeros(())
    side = int(round(probs.shape[1] ** 0.5))
    for b, (pos_b, masks_b) in enumerate(zip(positions, masks)):
        for pos, mask in zip(pos_b, masks_b):
            m = probs[b, :, pos].mean(-1).reshape(side, side)
            total = total + F.mse_loss(m / m.max().clamp_min(1e-8), mask)
    return total / len(positions)


def mask_tensor(mask, size: int) -> torch.Tensor:
    """A (size, size) float mask in [0, 1] from any 2-D boolean/float array (area-averaged)."""
    m = torch.as_tensor(np.asarray(mask), dtype=torch.float32)
    if m.dim() != 2:
        raise StudioError(f"a mask must be 2-D (got shape {tuple(m.shape)})")
    return F.interpolate(m[None, None], size=(size, size), mode="area")[0, 0]


def isolated(image: TrainingImage, masks: list, keep: tuple[int, ...]) -> TrainingImage:
    """The image with every object not in `keep` painted over by the background's median colour (right
    for plain backgrounds; on photos a rough cut-out)."""
    size = image.tensor.shape[-1]
    full = torch.stack([mask_tensor(m, size) > 0.5 for m in masks])
    claimed = full.any(0)
    pixels = image.tensor[:, ~claimed] if (~claimed).any() else image.tensor.reshape(3, -1)
    out = image.tensor.clone()
    drop = full[[j for j in range(len(masks)) if j not in keep]].any(0) if len(keep) < len(masks) else None
    if drop is not None:
        out[:, drop] = pixels.median(dim=1).values[:, None]
    return TrainingImage(out, image.caption, image.name)


def extract_concepts(manager, image: TrainingImage, masks: list, tokens: list[str], *,
                     steps_tokens: int | None = None, steps_joint: int | None = None, lr_tokens: float | None = None,
                     lr_joint: float | None = None, rank: int = 4, lora_targets: str = "attention+ff",
                     attention_weight: float | None = None, background: bool = True, isolate: bool = True,
                     batch: int = 2, seed=0,
                     progress=None, preview=None,
                     preview_every: int = 100) -> Edit:
    """Learn `tokens[i]` for the object under `masks[i]` of `image`; returns the edit (not applied).

    `progress(step, total)` every step; `preview(step, images)` every `preview_every` steps with one
    image per token ("a <token>")."""
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
    def get(key, v, lo, hi):
        d = DEFAULTS.get(f"toy_{key}", DEFAULTS[key]) if toy else DEFAULTS[key]
        return _number(key.replace("_", " "), d if v in (None, "") else v, lo, hi)

    steps_tokens = _whole("token steps", get("steps_tokens", steps_tokens, 0, 20000), 0, 20000)
    steps_joint = _whole("joint steps", get("steps_joint", steps_joint, 0, 20000), 0, 20000)
    lr_tokens, lr_joint = get("lr_tokens", lr_tokens, 0, 1), get("lr_joint", lr_joint, 0, 1)
    attention_weight = get("attention_weight", attention_weight, 0, 100)
    rank, batch, seed = _whole("LoRA rank", rank, 1, 256), _whole("batch size", batch, 1, 16), parse_seed(seed)
    if lora_targets not in LORA_TARGETS:
        raise StudioError(f"unknown LoRA targets {lora_targets!r}: choose one of {', '.join(LORA_TARGETS)}")
    total = steps_tokens + steps_joint
    if total == 0:
        raise StudioError("no training steps: set token or joint steps above 0")
    latent = pipe.unet.config.sample_size
    resolutions = cross_attention_resolutions(pipe.unet)
    attn_res = 16 if 16 in resolutions else max(resolutions)  # the published 16x16 maps where they exist

    with manager.job(), ExitStack() as cleanup:
        unet, text_encoder, device = pipe.unet, pipe.text_encoder, pipe.unet.device
        gen = torch.Generator("cpu").manual_seed(seed)
        flags = [(p, p.requires_grad) for m in (unet, text_encoder, pipe.vae) for p in m.parameters()]
        cleanup.callback(lambda: [p.requires_grad_(f) for p, f in flags])
        for p, _ in flags:
            p.requires_grad_(False)
        patch = Patch(pipe)
        cleanup.callback(patch.undo)
        init = initial_vectors(pipe, "", 1, False)
        ids = [install_tokens(pipe, t, init, patch)[0] for t in tokens]
        hook = TokenHook(text_encoder.get_input_embeddings(), ids, init.expand(len(ids), -1))
        cleanup.callback(hook.handle.remove)
        maps = CrossAttentionMaps(unet, attn_res)
        cleanup.callback(maps.remove)
        unet.train()
        cleanup.callback(unet.eval)

        subsets_all = [tuple(j for j in range(len(tokens)) if k >> j & 1) for k in range(1, 2 ** len(tokens))]
        if isolate:  # each subset's own picture: the other objects painted over with the background
            pictures = [isolated(image, masks, keep) for keep in subsets_all]
        else:
            pictures = [image] * len(subsets_all)
        x0_all = encode_images(pipe, pictures, flip=False).to(device)
        latent_masks = torch.stack([mask_tensor(m, latent) for m in masks]).to(device)
        attn_masks = torch.stack([mask_tensor(m, attn_res) for m in masks]).to(device)
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        opt = torch.optim.AdamW([hook.vectors], lr=lr_tokens, weight_decay=0.0)
        lora, start, losses = {}, time.perf_counter(), []
        for step in range(total):
            manager.check_stop()
            if step == steps_tokens:  # phase 2: tokens and a LoRA together
                cleanup.callback(lambda: remove_lora(unet))
                lora = add_lora(unet, rank, lora_targets)
                weights = [p for m in lora.values() for p in (m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight)]
                opt = torch.optim.AdamW([{"params": [hook.vectors], "lr": lr_joint},
                                         {"params": weights, "lr": lr_joint}], weight_decay=0.0)
            subsets = [torch.randperm(len(tokens), generator=gen)[:int(torch.randint(1, len(tokens) + 1, (1,),
                                                                                      generator=gen))].tolist()
                       for _ in range(batch)]
            prompts = [caption([tokens[i] for i in s]) for s in subsets]
            x0 = x0_all[[subsets_all.index(tuple(sorted(s))) for s in subsets]]
            union = torch.stack([latent_masks[s].amax(0) for s in subsets])[:, None]
            if isolate:  # the isolated pictures are right everywhere
                union = torch.ones_like(union)
            elif background:  # also the pixels no concept claims: "a <a>" then learns a plain background
                union = torch.maximum(union, 1 - latent_masks.amax(0))
            noise = torch.randn(x0.shape, generator=gen).to(device)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen).to(device)
            maps.maps.clear()
            ids_batch = _ids(pipe, prompts)
            cond = text_encoder(ids_batch)[0]
            pred = unet(scheduler.add_noise(x0, noise, t).to(unet.dtype), t,
                        encoder_hidden_states=cond).sample.float()
            err = (pred - _target(scheduler, x0, noise, t)) ** 2
            loss = (err * union).sum() / (union.sum() * err.shape[1]).clamp_min(1)
            if attention_weight and maps.maps:
                positions = [[(ids_batch[b] == ids[i]).nonzero()[:, 0] for i in s] for b, s in enumerate(subsets)]
                loss = loss + attention_weight * attention_loss(torch.stack(maps.maps).mean(0), positions,
                                                                [attn_masks[s] for s in subsets])
            if not torch.isfinite(loss):
                raise StudioError(f"training diverged at step {step + 1}: lower the learning rates")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if progress:
                progress(step + 1, total)
            if preview and ((step + 1) % preview_every == 0 or step + 1 == total):
                unet.eval()
                with torch.no_grad():
                    shots = [manager.generate(GenerationRequest(f"a {tok}", seed=seed)).images[0] for tok in tokens]
                unet.train()
                preview(step + 1, shots)
        tensors = {"embedding": hook.vectors[:1].detach().float().cpu().clone()}
        tensors.update({f"embedding.{i}": hook.vectors[i:i + 1].detach().float().cpu().clone()
                        for i in range(1, len(tokens))})
        for n, m in lora.items():
            tensors[f"{n}.lora_A"] = m.lora_A[ADAPTER].weight.detach().float().cpu().contiguous()
            tensors[f"{n}.lora_B"] = (m.lora_B[ADAPTER].weight.detach().float() * m.scaling[ADAPTER]).cpu().contiguous()
        seconds = time.perf_counter() - start

    tail = losses[-max(1, len(losses) // 10):]
    params = dict(method="break-a-scene", token=tokens[0], more_tokens=tokens[1:], strength=1.0,
                  modules=sorted(n for n in lora), base_model=base_signature(pipe), steps=total,
                  steps_tokens=steps_tokens, steps_joint=steps_joint, lr_tokens=lr_tokens, lr_joint=lr_joint, rank=rank,
                  lora_targets=lora_targets, attention_weight=attention_weight, batch=batch, seed=seed,
                  background=background, isolate=isolate, train_seconds=round(seconds, 2), final_loss=round(sum(tail) / len(tail), 5))
    return Edit("learned_concept", params, tensors, label=concept_label(params))
