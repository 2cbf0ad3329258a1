"""Teach the model a new concept from a few images: textual inversion, Custom Diffusion or LoRA.

One loop serves every method; they differ only in what is trainable:
- "ti": the token's input embedding(s) (Textual Inversion), optionally cross-initialized
  (started from the text encoder's *output* for the class word and pulled back toward it);
- "custom_diffusion": the token plus the full K/V projections of every cross-attention;
- "lora": the token plus peft LoRA adapters on the UNet (attention, or more of it).
Options for all: ClassDiffusion's semantic preservation (the token's caption feature kept close
to the class word's), prior preservation on class images the frozen model draws, gradient
checkpointing, mixed precision on GPU, periodic saved state to resume from.

The model itself is never changed: the token lives in a temporary patch (undone at the end), the
embedding is injected by a forward hook, K/V deltas by forward hooks, LoRA by a peft adapter that
is unloaded afterwards. The result is a "learned_concept" Edit, not yet applied; a stop or an
error leaves the model and the history exactly as they were.
"""
from __future__ import annotations

import json
import math
import random
import re
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors.torch import load_file, save_file
from torch import nn

from ..edits import Edit, Patch
from ..errors import StudioError
from ..generation import GenerationRequest, parse_seed
from .concept import MAX_VECTORS, base_signature, check_token, concept_label, install_tokens
from .images import TrainingImage

METHODS = {"ti": "Textual Inversion", "custom_diffusion": "Custom Diffusion (token + K/V)", "lora": "LoRA (peft)"}
# published learning rates (SD-1.5 scale) and what the toy model needs (its weights are ~10x larger in effect)
DEFAULTS = {
    "ti": dict(lr=5e-4, toy_lr=5e-3, steps=500, toy_steps=400),
    "custom_diffusion": dict(lr=1e-5, toy_lr=1e-4, steps=250, toy_steps=400),
    "lora": dict(lr=1e-4, toy_lr=1e-3, steps=500, toy_steps=400),
}
LORA_TARGETS = {
    "attention": r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
    "attention+ff": r".*(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out)$",
    "unet": r".*(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out|resnets\.\d+\.(conv1|conv2))$",
}
DEFAULT_TEMPLATES = ("a photo of {}", "a {}", "{}", "a picture of {}", "a photo of a {}")
MAX_STEPS = 20000
ADAPTER = "studio-train"

Progress = Callable[[int, int], None]
Preview = Callable[[int, list], None]


def _number(name, v, lo, hi) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise StudioError(f"{name} must be a number (got {v!r})") from None
    if not (math.isfinite(v) and lo <= v <= hi):
        raise StudioError(f"{name} must be from {lo:g} to {hi:g} (got {v:g})")
    return v


def _whole(name, v, lo, hi) -> int:
    v = _number(name, v, lo, hi)
    if v != int(v):
        raise StudioError(f"{name} must be a whole number (got {v:g})")
    return int(v)


def is_toy(pipe) -> bool:
    return pipe.unet.config.cross_attention_dim < 512


def default(pipe, method: str, key: str):
    return DEFAULTS[method][("toy_" if is_toy(pipe) else "") + key]


def expand(pipe, prompt: str) -> str:
    """A multi-vector token spelled out as the pipeline does it ("<x>" -> "<x> <x>_1 ...")."""
    convert = getattr(pipe, "maybe_convert_prompt", None)
    return convert(prompt, pipe.tokenizer) if convert else prompt


def fill(template: str, token: str) -> str:
    """A caption with the token in it: '{}' is replaced; a caption without '{}' gets the token in front."""
    return template.replace("{}", token) if "{}" in template else f"{token} {template}".strip()


# -- trainable pieces ---------------------------------------------------------------------------
class TokenHook:
    """Replaces the input embedding of the new token ids with trainable vectors."""

    def __init__(self, embedding: nn.Embedding, ids: list[int], init: torch.Tensor):
        self.ids = torch.tensor(ids, device=embedding.weight.device)
        self.vectors = init.detach().float().clone().to(embedding.weight.device).requires_grad_(True)
        self.handle = embedding.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        ids = args[0]
        hit = ids.unsqueeze(-1) == self.ids  # [..., L, n]
        if not hit.any():
            return None
        which = hit.float().argmax(-1)
        return torch.where(hit.any(-1, keepdim=True), self.vectors[which].to(out.dtype), out)


class DeltaHooks:
    """Full-rank trainable changes of Linear weights, as forward hooks: out += x @ delta.T."""

    def __init__(self, modules: dict[str, nn.Linear]):
        self.delta = {n: torch.zeros(m.out_features, m.in_features, device=m.weight.device, requires_grad=True)
                      for n, m in modules.items()}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name):
        def hook(module, args, out):
            return out + (args[0].float() @ self.delta[name].t()).to(out.dtype)
        return hook


def kv_modules(unet) -> dict[str, nn.Linear]:
    """Custom Diffusion's trainable weights: K and V of every cross-attention, by pipeline name."""
    return {f"unet.{n}.weight": m for n, m in unet.named_modules()
            if isinstance(m, nn.Linear) and n.split(".")[-2:-1] == ["attn2"] and n.endswith(("to_k", "to_v"))}


def check_no_adapters(unet) -> None:
    """Training needs the plain layers: refuse while unfused peft adapters (a composition) are installed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if (getattr(unet, "_hf_peft_config_loaded", False) and unet.peft_config) or any(
            isinstance(m, BaseTunerLayer) for m in unet.modules()):
        raise StudioError("the UNet carries unfused adapters (a weighted-adapter composition): switch it off or "
                          "undo it before training")


def add_lora(unet, rank: int, targets: str):
    """A peft LoRA adapter on `targets` (B = 0, so it starts as the identity); returns its layers by name."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    check_no_adapters(unet)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=LORA_TARGETS[targets]), adapter_name=ADAPTER)
    layers = {f"unet.{n.removesuffix('.base_layer')}.weight": m for n, m in unet.named_modules()
              if isinstance(m, LoraLayer)}
    for m in layers.values():
        for p in (*m.lora_A[ADAPTER].parameters(), *m.lora_B[ADAPTER].parameters()):
            p.data = p.data.float()
            p.requires_grad_(True)
    return layers


def remove_lora(unet) -> None:
    unet.unload_lora()
    if hasattr(unet, "peft_config"):
        del unet.peft_config
    unet._hf_peft_config_loaded = False


# -- data ---------------------------------------------------------------------------------------
@torch.no_grad()
def encode_images(pipe, images: list[TrainingImage] | torch.Tensor, flip: bool) -> torch.Tensor:
    """VAE latents (mean of the posterior, scaled) of every image, and of its mirror image if `flip`."""
    x = images if torch.is_tensor(images) else torch.stack([img.tensor for img in images])
    if flip:
        x = torch.cat([x, x.flip(-1)])
    vae = pipe.vae
    out = [vae.encode(x[i:i + 8].to(vae.device, vae.dtype)).latent_dist.mean for i in range(0, len(x), 8)]
    return torch.cat(out).float() * vae.config.scaling_factor


def _ids(pipe, prompts: list[str]) -> torch.Tensor:
    tok = pipe.tokenizer
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids.to(pipe.text_encoder.device)


def _target(scheduler, latents, noise, t):
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    return noise


# -- the loop -----------------------------------------------------------------------------------
def train_concept(manager, images: list[TrainingImage], token: str, *, method: str = "lora",
                  class_word: str = "", steps: int | None = None, lr: float | None = None,
                  token_lr: float | None = None, batch: int = 4,
                  rank: int = 4, lora_targets: str = "attention", vectors: int = 1, cross_init: bool = True,
                  cross_init_weight: float = 1e-5, semantic_weight: float = 0.0, prior_weight: float = 0.0,
                  prior_images: int = 8, prior_prompts: list[str] | None = None, templates: list[str] | None = None, flip: bool = True, seed=0,
                  gradient_checkpointing: bool = False, mixed_precision: bool = True,
                  progress: Progress | None = None, preview: Preview | None = None, preview_every: int = 100,
                  preview_prompts: list[str] | None = None, save_dir: str | Path | None = None,
                  save_every: int = 100, resume: bool = False, scope: str = "prompt", cut_mix: float = 0.0) -> Edit:
    """Train `token` on `images` (see images.load_images) and return a "learned_concept" Edit.

    Captions: an image's own caption (with '{}' where the token goes) or, without one, a random
    template of `templates`. `progress(step, steps)` after every step; `preview(step, images)`
    every `preview_every` steps with one image per preview prompt (default "a {token}").
    With `save_dir`, the trainable state is saved there every `save_every` steps and at a stop;
    `resume=True` continues from the state saved there (same settings required). `scope`: where the
    concept's UNet changes act once applied ("prompt": images whose prompt uses the token; "always").
    `cut_mix` (0: off): the fraction of training pictures that are Cut-Mix composites of a concept image
    and a prior image (see `composites`; needs prior prompts or a class word).
    """
    from .scope import check_scope

    scope = check_scope(scope)
    if method not in METHODS:
        raise StudioError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if lora_targets not in LORA_TARGETS:
        raise StudioError(f"unknown LoRA targets {lora_targets!r}: choose one of {', '.join(LORA_TARGETS)}")
    if not images:
        raise StudioError("no training images: add 3-10 images of the concept")
    pipe = manager.pipe
    token = check_token(pipe.tokenizer, token)
    check_no_adapters(pipe.unet)
    class_word = str(class_word or "").strip()
    steps = _whole("training steps", default(pipe, method, "steps") if steps in (None, "") else steps, 1, MAX_STEPS)
    lr = _number("learning rate", default(pipe, method, "lr") if lr in (None, "") else lr, 1e-8, 1.0)
    token_lr = _number("token learning rate", default(pipe, "ti", "lr") if token_lr in (None, "") else token_lr,
                       0, 1.0)
    batch = _whole("batch size", batch, 1, 64)
    rank = _whole("LoRA rank", rank, 1, 256)
    vectors = _whole("vectors per token", vectors, 1, MAX_VECTORS)
    semantic_weight = _number("semantic preservation weight", semantic_weight, 0, 100)
    prior_weight = _number("prior preservation weight", prior_weight, 0, 100)
    cross_init_weight = _number("cross-initialization weight", cross_init_weight, 0, 100)
    preview_every = _whole("preview interval", preview_every, 1, MAX_STEPS)
    save_every = _whole("save interval", save_every, 1, MAX_STEPS)
    seed = parse_seed(seed)
    prior_prompts = [p.strip() for p in prior_prompts or [] if p.strip()] or ([f"a {class_word}"] if class_word else [])
    if semantic_weight and not class_word:
        raise StudioError("semantic preservation needs a class word (what the concept is, e.g. 'dog')")
    cut_mix = _number("Cut-Mix fraction", cut_mix, 0, 0.9)
    if (prior_weight or cut_mix) and not prior_prompts:
        raise StudioError("prior preservation and Cut-Mix need a class word or prior prompts (what the model must keep "
                          "drawing)")
    prior_images = _whole("prior images", prior_images, 1, 1000)
    templates = [t for t in (templates or DEFAULT_TEMPLATES) if t.strip()]
    previews = preview_prompts or [f"a {token}"]
    settings = dict(method=method, token=token, class_word=class_word, steps=steps, lr=lr, token_lr=token_lr,
                    batch=batch, rank=rank,
                    lora_targets=lora_targets, vectors=vectors, cross_init=bool(cross_init),
                    cross_init_weight=cross_init_weight, semantic_weight=semantic_weight,
                    prior_weight=prior_weight, prior_prompts=prior_prompts if prior_weight or cut_mix else [], seed=seed,
                    cut_mix=cut_mix,
                    images=len(images))
    state_path = Path(save_dir) / "state.safetensors" if save_dir else None
    if resume and not (state_path and state_path.is_file()):
        raise StudioError(f"nothing to resume: no saved state in {save_dir!r}")

    with manager.job(), ExitStack() as cleanup:
        unet, text_encoder, device = pipe.unet, pipe.text_encoder, pipe.unet.device
        gen = torch.Generator("cpu").manual_seed(seed)
        rng = random.Random(seed)
        grad_flags = [(p, p.requires_grad) for m in (unet, text_encoder, pipe.vae) for p in m.parameters()]
        cleanup.callback(lambda: [p.requires_grad_(f) for p, f in grad_flags])
        for p, _ in grad_flags:
            p.requires_grad_(False)

        init = initial_vectors(pipe, class_word, vectors, cross_init)
        patch = Patch(pipe)
        ids = install_tokens(pipe, token, init, patch)
        cleanup.callback(patch.undo)
        token_hook = TokenHook(text_encoder.get_input_embeddings(), ids, init)
        cleanup.callback(token_hook.handle.remove)
        trainables = {"embedding": token_hook.vectors}
        deltas, lora = None, {}
        if method == "custom_diffusion":
            deltas = DeltaHooks(kv_modules(unet))
            cleanup.callback(lambda: [h.remove() for h in deltas.handles])
            trainables.update({f"{n}.delta": d for n, d in deltas.delta.items()})
        elif method == "lora":
            cleanup.callback(lambda: remove_lora(unet))
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)  # peft draws the adapter's starting A from the global generator
                lora = add_lora(unet, rank, lora_targets)
            for n, m in lora.items():
                trainables[f"{n}.lora_A"] = m.lora_A[ADAPTER].weight
                trainables[f"{n}.lora_B"] = m.lora_B[ADAPTER].weight
        if gradient_checkpointing and unet._supports_gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            cleanup.callback(unet.disable_gradient_checkpointing)
        unet.train()
        cleanup.callback(unet.eval)

        weights = [t for n, t in trainables.items() if n != "embedding"]
        groups = [{"params": [token_hook.vectors], "lr": lr if method == "ti" else token_lr}]
        opt = torch.optim.AdamW(groups + ([{"params": weights, "lr": lr}] if weights else []), weight_decay=0.0)
        start_step = 0
        if resume:
            start_step = load_state(state_path, settings, trainables, opt)

        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        latents = encode_images(pipe, images, flip)
        captions = [img.caption for img in images] * (2 if flip else 1)
        if prior_weight or cut_mix:
            prior, prior_texts = prior_latents(manager, prior_prompts, prior_images, seed)
        if cut_mix:
            count = round(len(latents) * cut_mix / (1 - cut_mix))
            pixels, texts = composites(pipe, images, prior, prior_texts, count, gen)
            latents = torch.cat([latents, encode_images(pipe, pixels, False)])
            captions += texts
        init_features = None
        if cross_init and class_word:
            init_features = init.detach().float().to(device)
        autocast = (torch.autocast("cuda", dtype=pipe.unet.dtype) if mixed_precision and device.type == "cuda"
                    and pipe.unet.dtype != torch.float32 else nullcontext())
        start, losses = time.perf_counter(), []
        step = start_step
        try:
            for step in range(start_step, steps):
                manager.check_stop()
                pick = torch.randint(0, len(latents), (batch,), generator=gen)
                x0 = latents[pick].to(device)
                texts = [expand(pipe, fill(captions[i] or rng.choice(templates), token)) for i in pick.tolist()]
                if prior_weight:
                    which = torch.randint(0, len(prior), (batch,), generator=gen)
                    x0 = torch.cat([x0, prior[which].to(device)])
                    texts += [prior_texts[i] for i in which.tolist()]
                noise = torch.randn(x0.shape, generator=gen).to(device)
                t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=gen).to(device)
                with autocast:
                    cond = text_encoder(_ids(pipe, texts))[0]
                    pred = unet(scheduler.add_noise(x0, noise, t).to(unet.dtype), t, encoder_hidden_states=cond).sample
                err = (pred.float() - _target(scheduler, x0, noise, t)) ** 2
                loss = err[:batch].mean()
                if prior_weight:
                    loss = loss + prior_weight * err[batch:].mean()
                if semantic_weight:
                    loss = loss + semantic_weight * semantic_loss(pipe, token, class_word, texts[:batch])
                if init_features is not None and cross_init_weight:
                    loss = loss + cross_init_weight * (token_hook.vectors - init_features).pow(2).sum()
                if not torch.isfinite(loss):
                    raise StudioError(f"training diverged at step {step + 1} (loss {float(loss)}): lower the "
                                      f"learning rate (now {lr:g})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                done = step + 1
                if progress:
                    progress(done, steps)
                if state_path and done % save_every == 0 and done < steps:
                    save_state(state_path, settings, trainables, opt, done)
                if preview and (done % preview_every == 0 or done == steps):
                    unet.eval()
                    with torch.no_grad():
                        shots = [manager.generate(GenerationRequest(p, seed=seed)).images[0] for p in previews]
                    unet.train()
                    preview(done, shots)
        except BaseException:
            if state_path and step > start_step:
                save_state(state_path, settings, trainables, opt, step)
            raise
        tensors = {n: t.detach().float().cpu().contiguous() for n, t in trainables.items()}
        for n, m in lora.items():  # fold the adapter's scale (alpha / r) into B
            tensors[f"{n}.lora_B"] *= m.scaling[ADAPTER]
        seconds = time.perf_counter() - start

    tail = losses[-max(1, len(losses) // 10):] or [float("nan")]
    modules = sorted({n.rsplit(".", 1)[0] for n in tensors if n != "embedding"})
    params = {**settings, "scope": scope, "strength": 1.0, "modules": modules, "base_model": base_signature(pipe), "train_seconds": round(seconds, 2),
              "final_loss": round(sum(tail) / len(tail), 5), "resumed_from": start_step}
    return Edit("learned_concept", params, tensors, label=concept_label(params))


@torch.no_grad()
def initial_vectors(pipe, class_word: str, vectors: int, cross_init: bool) -> torch.Tensor:
    """Where the token starts: the class word's text-encoder output (Cross Initialization), its input
    embedding, or (no class word) the mean input embedding; repeated for each vector."""
    emb = pipe.text_encoder.get_input_embeddings().weight
    if class_word:
        ids = pipe.tokenizer(class_word, add_special_tokens=False).input_ids
        if cross_init:
            out = pipe.text_encoder(_ids(pipe, [class_word]))[0][0, 1:1 + len(ids)]
            v = out.mean(0)
        else:
            v = emb[ids].mean(0)
    else:
        v = emb.mean(0)
    return v.float().cpu().expand(vectors, -1).clone()


def semantic_loss(pipe, token: str, class_word: str, texts: list[str]) -> torch.Tensor:
    """ClassDiffusion's semantic preservation: 1 - cos between the pooled text features of each caption
    and of the same caption with the class word in place of the token."""
    te = pipe.text_encoder
    with_token = te(_ids(pipe, texts))[1].float()
    with torch.no_grad():
        spelled = re.compile(rf"{re.escape(token)}(?:\s+{re.escape(token)}_\d+)*")
        with_class = te(_ids(pipe, [spelled.sub(class_word, t) for t in texts]))[1].float()
    return (1 - nn.functional.cosine_similarity(with_token, with_class, dim=-1)).mean()


@torch.no_grad()
def composites(pipe, images: list[TrainingImage], prior: torch.Tensor, prior_texts: list[str], count: int,
               gen: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """`count` Cut-Mix pictures (SVDiff's augmentation, with the frozen model's own prior images as the
    partner): a concept image and a prior image, each shrunk to half the frame, side by side or one above
    the other on the concept image's background, captioned "<concept caption> and <prior prompt>" in
    either order. A concept learned only alone is lost in a two-object prompt (on the toy model a
    learned heart never appeared in "a <heart> and a blue square"); these teach it to share the frame."""
    vae = pipe.vae
    partners = torch.cat([vae.decode(prior[i:i + 8].to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
                          for i in range(0, len(prior), 8)]).float().clamp(-1, 1).cpu()
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
            small = F.interpolate(picture[None], size=(side, side), mode="bilinear", antialias=True,
                                  align_corners=False)[0]
            y, x = ((k * side, (res - side) // 2) if vertical else ((res - side) // 2, k * side))
            canvas[:, y:y + side, x:x + side] = small
        out.append(canvas)
        own = images[i].caption or "a {}"
        texts.append(f"{prior_texts[j]} and {own}" if swap else f"{own} and {prior_texts[j]}")
    return torch.stack(out), texts


@torch.no_grad()
def prior_latents(manager, prompts: list[str], count: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Latents of `count` images the frozen model draws for `prompts` (cycled), and their prompts:
    prior preservation (DreamBooth, Custom Diffusion's regularization images)."""
    pipe = manager.pipe
    texts = [prompts[i % len(prompts)] for i in range(count)]
    gen = torch.Generator("cpu").manual_seed(seed + 1)
    out = [pipe(prompt=texts[i:i + 8], num_inference_steps=20, output_type="latent", generator=gen).images
           for i in range(0, count, 8)]
    return torch.cat(out).float().cpu(), texts


# -- saved state (resume) -----------------------------------------------------------------------
def save_state(path: Path, settings: dict, trainables: dict, opt, step: int) -> None:
    """Trainable tensors and Adam moments as safetensors, settings and step as JSON (no pickle)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"param/{n}": t.detach().float().cpu().contiguous() for n, t in trainables.items()}
    for i, (n, t) in enumerate(trainables.items()):
        for k, v in opt.state.get(t, {}).items():
            if torch.is_tensor(v):
                tensors[f"opt/{n}/{k}"] = v.detach().float().cpu().reshape(-1).contiguous()
    save_file(tensors, str(path), metadata={"settings": json.dumps(settings), "step": str(step)})


def load_state(path: Path, settings: dict, trainables: dict, opt) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    saved = json.loads(meta.get("settings", "{}"))
    changed = [k for k in settings if k not in ("steps",) and saved.get(k) != settings[k]]
    if changed:
        raise StudioError(f"the saved state was trained with other settings ({', '.join(changed)}): resume with "
                          "the same settings or start afresh")
    tensors = load_file(str(path))
    with torch.no_grad():
        for n, t in trainables.items():
            t.copy_(tensors[f"param/{n}"].reshape(t.shape))
    step = int(meta["step"])
    for n, t in trainables.items():
        moments = {k.rsplit("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"opt/{n}/")}
        if moments:
            opt.state[t] = {k: (v.reshape(t.shape).to(t.device) if k != "step" else v.reshape(()))
                            for k, v in moments.items()}
    return step
