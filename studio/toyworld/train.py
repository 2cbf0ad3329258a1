"""Train the toy-world text-to-image model from scratch (VAE, then UNet + text encoder), saved in fp16 to
assets/toy-model; the same config, seed and device give the same model.

    python -m studio.toyworld.train --config gpu   # the issue's probe config, ~7 min on an H100
    python -m studio.toyworld.train --config cpu   # a smaller config for a 2-core CPU
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ..demo_model import SCHEDULER_CONFIG, TEXT_CONFIG, UNET_CONFIG, VAE_CONFIG
from ..loading import TOY_MODEL
from ..tokenizer import build_clip_tokenizer
from .scenes import make_scene


@dataclass(frozen=True)
class ToyConfig:
    scenes: int = 40_000
    text_hidden: int = 128
    text_layers: int = 3
    unet_channels: tuple = (64, 128, 128)
    vae_channels: tuple = (32, 64, 64)
    vae_steps: int = 800
    vae_batch: int = 128
    vae_lr: float = 1e-3
    decoder_steps: int = 0  # then the decoder alone (the encoder, so the UNet's latents, stays fixed)
    steps: int = 3000
    batch: int = 256
    lr: float = 5e-4
    caption_dropout: float = 0.1


CONFIGS = {
    "gpu": ToyConfig(),
    # ~1 hour on a 2-core CPU: same UNet, a lighter VAE, far fewer samples seen than the GPU config
    "cpu": ToyConfig(scenes=12_000, vae_channels=(32, 32, 32), vae_steps=400, vae_batch=32, decoder_steps=1500,
                     steps=2500, batch=48, lr=1e-3),
}


def build_models(cfg: ToyConfig):
    """The demo model's architecture at the config's widths, random weights."""
    h, unet_channels, vae_channels = cfg.text_hidden, cfg.unet_channels, cfg.vae_channels
    text = CLIPTextModel(CLIPTextConfig(**dict(TEXT_CONFIG, hidden_size=h, intermediate_size=4 * h,
                                               num_hidden_layers=cfg.text_layers, projection_dim=h)))
    unet = UNet2DConditionModel(**dict(UNET_CONFIG, block_out_channels=unet_channels, cross_attention_dim=h,
                                       norm_num_groups=min(32, unet_channels[0])))
    vae = AutoencoderKL(**dict(VAE_CONFIG, block_out_channels=vae_channels, norm_num_groups=min(32, vae_channels[0])))
    return text, unet, vae


def scene_dataset(n: int, seed: int, tokenizer, log=print):
    t = time.time()
    images, captions = np.empty((n, 64, 64, 3), np.uint8), []
    for i in range(n):
        scene = make_scene(seed * 10_000_000 + i)
        images[i] = scene.image
        captions.append(scene.caption)
        if (i + 1) % 5000 == 0:
            log(f"  {i + 1}/{n} scenes ({time.time() - t:.0f} s)")
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), ids


def to_pixels(images_u8: torch.Tensor, device) -> torch.Tensor:
    return images_u8.to(device).float() / 127.5 - 1


def fit(what: str, params: list, loss, steps: int, lr: float, log=print, weight_decay: float = 0.0, clip=None):
    """AdamW with a one-cycle schedule on loss() for `steps` steps, logged every 100."""
    opt = torch.optim.AdamW(params, lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    for step in range(steps):
        value = loss()
        opt.zero_grad(set_to_none=True)
        value.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            rate = (time.time() - t0) / (step + 1)
            log(f"  {what} step {step}/{steps}: loss {value.item():.4f} ({rate:.2f} s/step, "
                f"~{rate * (steps - step - 1) / 60:.0f} min left)")


def train_vae(vae, images, cfg, device, log=print, decoder_only: bool = False):
    """The whole VAE (L1 + MSE + tiny KL), or with decoder_only the decoder on the encoder's means."""
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()] if decoder_only else list(vae.parameters())
    for p in params:
        p.requires_grad_(True)

    def loss():
        x = to_pixels(images[torch.randint(len(images), (cfg.vae_batch,))], device)
        with torch.set_grad_enabled(not decoder_only):
            posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.mean if decoder_only else posterior.sample()).sample
        return F.l1_loss(recon, x) + F.mse_loss(recon, x) + (0 if decoder_only else 1e-6 * posterior.kl().mean())

    vae.train()
    fit("decoder" if decoder_only else "vae", params, loss, cfg.decoder_steps if decoder_only else cfg.vae_steps,
        cfg.vae_lr, log)
    vae.eval()


@torch.no_grad()
def encode_all(vae, images, device, batch=256):
    return torch.cat([vae.encode(to_pixels(images[i:i + batch], device)).latent_dist.mean
                      for i in range(0, len(images), batch)])


def train_unet(unet, text, latents, ids, empty_ids, cfg, device, log=print):
    """UNet and text encoder together on the DDPM noise loss, the caption emptied at rate caption_dropout."""
    noise_sched = DDPMScheduler(**SCHEDULER_CONFIG)

    def loss():
        idx = torch.randint(len(latents), (cfg.batch,))
        z = latents[idx].to(device)
        drop = torch.rand(cfg.batch, device=device) < cfg.caption_dropout
        tokens = torch.where(drop[:, None], empty_ids.to(device), ids[idx].to(device))
        noise = torch.randn_like(z)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.batch,), device=device)
        pred = unet(noise_sched.add_noise(z, noise, t), t, encoder_hidden_states=text(tokens)[0]).sample
        return F.mse_loss(pred, noise)

    unet.train(), text.train()
    fit("unet", list(unet.parameters()) + list(text.parameters()), loss, cfg.steps, cfg.lr, log, 1e-2, clip=1.0)
    unet.eval(), text.eval()


def train(cfg: ToyConfig, device: str = "cpu", seed: int = 0, out: Path = TOY_MODEL, log=print, resume: Path | None = None):
    torch.manual_seed(seed)
    np.random.seed(seed)
    dev = torch.device(device)
    start = time.time()
    tokenizer = build_clip_tokenizer()
    log(f"generating {cfg.scenes} scenes")
    images, ids = scene_dataset(cfg.scenes, seed, tokenizer, log)
    empty_ids = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    if resume:  # continue a saved model: its VAE encoder (so its latent space) stays as it is
        old = StableDiffusionPipeline.from_pretrained(resume, dtype=torch.float32)
        text, unet, vae = (m.to(dev).requires_grad_(True) for m in (old.text_encoder, old.unet, old.vae))
        vae.requires_grad_(False)
        scale = vae.config.scaling_factor
        latents = encode_all(vae, images, dev) * scale
    else:
        text, unet, vae = (m.to(dev) for m in build_models(cfg))
        log(f"training VAE ({sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M params)")
        train_vae(vae, images, cfg, dev, log)
        latents = encode_all(vae, images, dev)
        scale = float(1 / latents.std())
        vae.register_to_config(scaling_factor=scale)
        latents = latents * scale
    log(f"latent scaling factor {scale:.4f}; UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M, "
        f"text encoder {sum(p.numel() for p in text.parameters()) / 1e6:.2f}M parameters")
    if cfg.steps:
        train_unet(unet, text, latents, ids, empty_ids, cfg, dev, log)
    if cfg.decoder_steps:
        log("fine-tuning the VAE decoder")
        train_vae(vae, images, cfg, dev, log, decoder_only=True)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
        scheduler=DPMSolverMultistepScheduler(**SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    out = Path(out)
    pipe.to(torch.device("cpu"), torch.float16).save_pretrained(out, safe_serialization=True)
    previous = json.loads((Path(resume) / "training.json").read_text()) if resume and (Path(resume) / "training.json").is_file() else None
    (out / "training.json").write_text(json.dumps(dict(config=asdict(cfg), seed=seed, device=str(dev), previous=previous,
                                                       device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                                                       minutes=round((time.time() - start) / 60, 1)), indent=2))
    log(f"saved to {out} after {(time.time() - start) / 60:.1f} min")
    return pipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=list(CONFIGS), default="gpu" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(TOY_MODEL))
    ap.add_argument("--steps", type=int, help="override the UNet step count")
    ap.add_argument("--vae-steps", type=int)
    ap.add_argument("--decoder-steps", type=int)
    ap.add_argument("--lr", type=float, help="override the UNet/text encoder learning rate")
    ap.add_argument("--scenes", type=int)
    ap.add_argument("--resume", help="continue training the UNet/text encoder of this model folder")
    args = ap.parse_args()
    cfg = CONFIGS[args.config]
    overrides = {k: v for k, v in vars(args).items() if k in asdict(cfg) and v is not None}
    train(replace(cfg, **overrides), args.device, args.seed, args.out, lambda m: print(m, flush=True), args.resume)


if __name__ == "__main__":
    main()
