"""The one trainer loop (methods supply `loss(step)` and what they train) and what every run needs around it."""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from . import models
from .edit_files import save_tensors
from .errors import StudioError

ADAPTER = "studio-train"
_ATTN, _FF = r"attn[12]\.(to_q|to_k|to_v|to_out\.0)", r"ff\.net\.(0\.proj|2)|proj_in|proj_out"
LORA_TARGETS = {
    "attention": rf".*{_ATTN}$",
    "attention+ff": rf".*({_ATTN}|{_FF})$",
    "unet": rf".*({_ATTN}|{_FF}|resnets\.\d+\.(conv1|conv2))$",
}
Progress = Callable[[int, int], None]
Preview = Callable[[int, list], None]


@dataclass
class TrainingImage:
    tensor: torch.Tensor  # [3, R, R] in [-1, 1]
    caption: str | None = None
    name: str = ""
    mask: torch.Tensor | None = field(default=None, repr=False)  # [R, R] in {0, 1}


def concept_label(params: dict) -> str:
    tokens = ", ".join([params.get("token") or params.get("name", "adapter"), *params.get("more_tokens", [])])
    label = f"learn {tokens} ({params.get('method', '?')})"
    s = params.get("strength", 1.0)
    return label if s == 1.0 else f"{label} x{s:g}"


def is_toy(pipe) -> bool:
    """A toy-sized model (cross-attention width below 512): it needs about 10x the published learning rates."""
    return models.of(pipe).denoiser.config.cross_attention_dim < 512


@contextmanager
def frozen(pipe, train_mode: bool = True):
    """Every component frozen in the block (a run trains only what it adds); restored whatever happens."""
    components = [m for m in pipe.components.values() if isinstance(m, nn.Module)]
    flags = [(p, p.requires_grad) for m in components for p in m.parameters()]
    modes = [(m, m.training) for m in components]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        models.of(pipe).denoiser.train(train_mode)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.train(mode)


def check_no_adapters(module) -> None:
    """Training needs the plain layers: refuse while unfused peft adapters are installed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if (getattr(module, "_hf_peft_config_loaded", False) and module.peft_config) or any(
            isinstance(m, BaseTunerLayer) for m in module.modules()):
        raise StudioError("the UNet carries unfused adapters (a composition): switch it off or undo it to train")


@contextmanager
def lora(module, rank: int, targets, seed: int = 0, *, init: dict | None = None):
    """A peft LoRA for the block; its fp32 factors by '{weight}.lora_A'/'_B' (B = 0, A from `seed`, alpha = r)."""
    from diffusers.utils import recurse_remove_peft_layers
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    check_no_adapters(module)
    device = next(module.parameters()).device
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            module.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=(
                LORA_TARGETS[targets] if isinstance(targets, str) else list(targets))), adapter_name=ADAPTER)
        factors = {}
        for n, m in module.named_modules():
            if isinstance(m, LoraLayer):
                name = f"unet.{n.removesuffix('.base_layer')}.weight"
                a, b = m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight
                a.data = a.data.float() if init is None else init[name].to(a.device)
                b.data = b.data.float().zero_()
                factors[f"{name}.lora_A"], factors[f"{name}.lora_B"] = a.requires_grad_(), b.requires_grad_()
        yield factors
    finally:
        recurse_remove_peft_layers(module)
        if hasattr(module, "peft_config"):
            del module.peft_config
        module._hf_peft_config_loaded = False


@contextmanager
def adapters_off(module):
    module.disable_adapters()
    try:
        yield
    finally:
        module.enable_adapters()


class TokenHook:
    """A forward hook replacing the new token ids' input embeddings with trainable vectors."""

    def __init__(self, embedding: nn.Embedding, ids: list[int], init: torch.Tensor):
        self.ids = torch.tensor(ids, device=embedding.weight.device)
        self.vectors = init.detach().float().clone().to(embedding.weight.device).requires_grad_(True)
        self.handle = embedding.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        hit = args[0].unsqueeze(-1) == self.ids  # [..., L, n]
        if not hit.any():
            return None
        which = hit.float().argmax(-1)
        return torch.where(hit.any(-1, keepdim=True), self.vectors[which].to(out.dtype), out)


def diffusion_error(family, scheduler, x0: torch.Tensor, cond, gen: torch.Generator) -> torch.Tensor:
    """The DDPM loss before its mean (fp32), for a method to weight; draws the noise, then t, from gen."""
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=gen).to(x0.device)
    target = scheduler.get_velocity(x0, noise, t) if scheduler.config.prediction_type == "v_prediction" else noise
    return (family.predict(scheduler.add_noise(x0, noise, t), t, cond).float() - target) ** 2


def detached(tensors: dict) -> dict[str, torch.Tensor]:
    return {n: t.detach().float().cpu().contiguous() for n, t in tensors.items()}


def train(manager, loss, trainables: dict, steps: int, *, lr: float, groups: list | None = None, start: int = 0,
          total: int | None = None, progress: Progress | None = None, preview: Preview | None = None, draw=None,
          preview_every: int = 100, saved: Saved | None = None, what: str = "training") -> list[float]:
    """Steps start..steps-1 of a `total`-step run (Adam on loss(step)), with stops, progress and previews; losses."""
    opt = torch.optim.AdamW(groups or [{"params": list(trainables.values()), "lr": lr}], weight_decay=0.0)
    if saved and saved.resume:
        start = saved.step = saved.load(trainables, opt)
    total, done, losses = total or steps, start, []
    denoiser = models.of(manager.pipe).denoiser
    try:
        for step in range(start, steps):
            manager.check_stop()
            value = loss(step)
            if not torch.isfinite(value):
                raise StudioError(f"{what} diverged at step {step + 1} (loss {float(value)}): lower the learning "
                                  f"rate (now {lr:g})")
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            losses.append(float(value.detach()))
            done = step + 1
            if progress:
                progress(done, total)
            if saved and done % saved.every == 0 and done < total:
                saved.save(trainables, opt, done)
            if preview and (done % preview_every == 0 or done == total):
                manager.check_stop()
                mode = denoiser.training
                denoiser.eval()
                with torch.no_grad():
                    images = draw()
                denoiser.train(mode)
                preview(done, images)
    except BaseException:
        if saved and done > start:
            saved.save(trainables, opt, done)
        raise
    return losses


@dataclass
class Saved:
    """Resume state, written every `every` steps and on an early end; `step`: where the run started."""

    path: Path
    settings: dict
    every: int
    resume: bool = False
    step: int = 0

    def check(self) -> int:
        with safe_open(str(self.path), "pt") as f:
            meta = f.metadata() or {}
        saved = json.loads(meta.get("settings", "{}"))
        if changed := [k for k in self.settings if k != "steps" and saved.get(k) != self.settings[k]]:
            raise StudioError(f"the saved state was trained with other settings ({', '.join(changed)}): resume "
                              "with the same settings or start afresh")
        return int(meta["step"])

    def save(self, trainables: dict, opt, step: int) -> None:
        tensors = {f"param/{n}": t for n, t in detached(trainables).items()}
        tensors.update({f"opt/{n}/{k}": v.detach().float().reshape(-1) for n, t in trainables.items()
                        for k, v in opt.state.get(t, {}).items() if torch.is_tensor(v)})
        save_tensors(tensors, self.path, {"settings": json.dumps(self.settings), "step": step})

    def load(self, trainables: dict, opt) -> int:
        step, tensors = self.check(), load_file(str(self.path))
        for n, t in trainables.items():
            t.data.copy_(tensors[f"param/{n}"].reshape(t.shape))
            moments = {k.rsplit("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"opt/{n}/")}
            opt.state[t] = {k: v.reshape(()) if k == "step" else v.reshape(t.shape).to(t.device)
                            for k, v in moments.items()}
        return step
