"""The Stable Diffusion 1.x/2.x family: one CLIP text encoder, a UNet with cross-attention, AutoencoderKL.
Generation is the diffusers pipeline's own loop, so the studio's images are the pipeline's bit for bit."""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..edits import module_slot
from ..errors import StudioError
from ..tokenizer import check_token, prompt_text, token_names

VAE_BATCH = 8  # images per VAE call: bounds the activation memory of encoding many training images


@dataclass
class Conditioning:
    """One row per prompt: embeds (B, T, d) cross-attention reads; pooled (B, d') (SD: for losses only; SDXL/Flux:
    a model input); extra: other model inputs by name."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.embeds)

    def rows(self, index) -> "Conditioning":
        pick = (lambda t: t[index]) if torch.is_tensor(index) or isinstance(index, slice) else (lambda t: t[[index]])
        return replace(self, embeds=pick(self.embeds), pooled=None if self.pooled is None else pick(self.pooled),
                       extra={k: pick(v) for k, v in self.extra.items()})

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        first = items[0]
        pooled = None if first.pooled is None else torch.cat([c.pooled for c in items])
        return Conditioning(torch.cat([c.embeds for c in items]), pooled,
                            {k: torch.cat([c.extra[k] for c in items]) for k in first.extra})


def check_checkpoint(path) -> None:
    """Refuse, by its key names, a .safetensors that is no whole SD-1/2 checkpoint (diffusers' error would mislead)."""
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    name = Path(path).name
    kinds = {"conditioner.embedders.1.": "an SDXL checkpoint", "double_blocks.": "a Flux checkpoint",
             "lora_unet_": "a LoRA", "lora_te": "a LoRA", "string_to_param": "an embedding", "emb_params": "an embedding"}
    for marker, what in kinds.items():
        if any(marker in k for k in keys):
            raise StudioError(f"{name} is {what}, not a Stable Diffusion 1.x/2.x checkpoint"
                              + (": load it in the Customize tab's import" if "checkpoint" not in what else ""))
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise StudioError(f"{name} holds no Stable Diffusion UNet weights (keys 'model.diffusion_model.*'): it is not "
                          "a model checkpoint; give a whole SD-1.x/2.x .safetensors or a diffusers folder")


class StableDiffusion:
    title = "Stable Diffusion 1.x/2.x"
    pipeline_names = ("StableDiffusionPipeline",)
    lora_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}  # what a kohya LoRA covers, by key prefix

    def __init__(self, pipe):
        self.pipe = pipe

    @staticmethod
    def matches(pipe) -> bool:
        return hasattr(pipe, "unet") and hasattr(pipe, "text_encoder") and getattr(pipe, "text_encoder_2", None) is None

    @staticmethod
    def load(source, kind: str, dtype: torch.dtype):
        """The pipeline from a diffusers folder, a hub id or (`kind` single-file) a checkpoint file."""
        from diffusers import StableDiffusionPipeline

        if kind == "single-file":
            if str(source).lower().endswith(".safetensors"):
                check_checkpoint(source)
            return StableDiffusionPipeline.from_single_file(source, load_safety_checker=False, dtype=dtype)
        return StableDiffusionPipeline.from_pretrained(source, safety_checker=None, requires_safety_checker=False,
                                                       dtype=dtype)

    @property
    def denoiser(self) -> nn.Module:
        return self.pipe.unet

    @property
    def tokenizers(self) -> list:
        return [self.pipe.tokenizer]

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [self.pipe.text_encoder]

    def spelled(self, prompt: str) -> str:
        """The prompt as the pipeline reads it: every multi-vector token spelled out ("<x>" -> "<x> <x>_1 ...")."""
        convert = getattr(self.pipe, "maybe_convert_prompt", None)
        return convert(prompt, self.pipe.tokenizer) if convert else prompt

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        """(B, max_tokens) padded, truncated ids of the spelled prompts, on the text encoder's device."""
        tok = self.pipe.tokenizer
        return tok([self.spelled(prompt_text(p)) for p in prompts], padding="max_length", max_length=tok.model_max_length,
                   truncation=True, return_tensors="pt").input_ids.to(self.pipe.text_encoder.device)

    def encode(self, prompts: list[str], ids: torch.Tensor | None = None) -> Conditioning:
        """The prompts as the pipeline's encode_prompt makes them (no batch repeat); `ids` replaces the prompts."""
        out = self.pipe.text_encoder(self.token_ids(prompts) if ids is None else ids)
        return Conditioning(out[0], out[1])

    def text_projections(self) -> dict[str, nn.Linear]:
        """The layers that read only the text: every cross-attention's K and V, by weight name."""
        return {f"unet.{n}.weight": m for n, m in self.pipe.unet.named_modules()
                if isinstance(m, nn.Linear) and n.split(".")[-2:-1] == ["attn2"] and n.endswith(("to_k", "to_v"))}

    def attention_sites(self, cross: bool | None = None) -> dict[str, nn.Module]:
        """Attention layers by processor name: cross=True the text-conditioned ones, False self-attention, None all."""
        from diffusers.models.attention_processor import Attention

        return {f"{n}.processor": m for n, m in self.pipe.unet.named_modules() if isinstance(m, Attention)
                and (cross is None or m.is_cross_attention == cross)}

    def attention_resolutions(self) -> list[int]:
        """Latent heights of the cross-attention layers at the default size, finest first."""
        cfg = self.pipe.unet.config
        n = len(cfg.block_out_channels)
        depths = {i for i, t in enumerate(cfg.down_block_types) if "CrossAttn" in t}
        depths |= {n - 1 - j for j, t in enumerate(cfg.up_block_types) if "CrossAttn" in t}
        if cfg.mid_block_type and "CrossAttn" in cfg.mid_block_type:
            depths.add(n - 1)
        return sorted({-(-self.latent_side // 2 ** k) for k in depths}, reverse=True)

    def guided(self, guidance: float) -> bool:
        """Whether classifier-free guidance runs (a negative row per image): not on guidance-embedding UNets."""
        return guidance > 1 and self.pipe.unet.config.get("time_cond_proj_dim") is None

    @property
    def latent_side(self) -> int:
        side = self.pipe.unet.config.sample_size
        return side if isinstance(side, int) else side[0]

    @property
    def default_size(self) -> int:
        return self.latent_side * self.pipe.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        return max(8, self.pipe.vae_scale_factor)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.pipe.vae_scale_factor
        return self.pipe.unet.config.in_channels, height // f, width // f

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (posterior mean x scaling factor, fp32) of pictures x in [-1, 1], (N, 3, H, W)."""
        vae = self.pipe.vae
        out = [vae.encode(b.to(vae.device, vae.dtype)).latent_dist.mean for b in x.split(VAE_BATCH)]
        return torch.cat(out).float() * vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Pictures in [-1, 1] (fp32, on the CPU) of latents z."""
        vae = self.pipe.vae
        out = [vae.decode(b.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample for b in z.split(VAE_BATCH)]
        return torch.cat(out).float().cpu()

    def predict(self, x: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
        """The denoiser's output (noise, v or x0 by the scheduler's prediction type) for latents x at t."""
        unet = self.pipe.unet
        return unet(x.to(unet.dtype), t, encoder_hidden_states=cond.embeds.to(unet.dtype)).sample

    def denoise(self, cond: Conditioning, negative: Conditioning | None = None, *, steps: int = 20,
                guidance: float = 7.5, scheduler=None, latents: torch.Tensor | None = None, generator=None,
                height: int | None = None, width: int | None = None, images_per_prompt: int = 1,
                on_step=None, stop_after: int | None = None, output: str = "pil"):
        """The one denoising loop (the family's diffusers pipeline); `negative` defaults to the empty prompt.
        `on_step(pipe, i, t, kwargs)` may raise to stop; `stop_after` steps end it (0: the latents as given)."""
        if stop_after == 0:
            return latents
        pipe = self.pipe

        def step_end(p, i, t, kwargs):
            kwargs = on_step(p, i, t, kwargs) if on_step else kwargs
            if stop_after is not None and i + 1 >= stop_after:
                p._interrupt = True
            return kwargs

        if negative is None and guidance > 1:
            negative = self.encode([""] * len(cond))
        before = pipe.scheduler
        pipe.scheduler = scheduler or before
        try:
            return pipe(prompt_embeds=cond.embeds, negative_prompt_embeds=None if negative is None else negative.embeds,
                        num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                        num_images_per_prompt=images_per_prompt, latents=latents, generator=generator,
                        output_type=output, callback_on_step_end=step_end).images
        except torch.cuda.OutOfMemoryError:
            raise StudioError("out of memory while generating: lower the batch size or the image size") from None
        finally:
            pipe.scheduler = before

    def token_tables(self) -> list[nn.Embedding]:
        """The input embedding tables a new token's vectors go into, one per tokenizer."""
        return [self.pipe.text_encoder.get_input_embeddings()]

    def install_tokens(self, token: str, vectors: torch.Tensor, patch) -> list[int]:
        """Add `token` (and its extra vector names) with `vectors`, through `patch` (exact undo); returns their ids."""
        pipe = self.pipe
        names = token_names(check_token(pipe.tokenizer, token), len(vectors))
        tokenizer = copy.deepcopy(pipe.tokenizer)
        tokenizer.add_tokens(names)
        ids = tokenizer.convert_tokens_to_ids(names)
        old = pipe.text_encoder.get_input_embeddings()
        if vectors.shape[-1] != old.embedding_dim:
            raise StudioError(f"the concept's embedding has width {vectors.shape[-1]}, this text encoder's is "
                              f"{old.embedding_dim}: it was learned on another model")
        grown = nn.Embedding(len(tokenizer), old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            grown.weight[: old.num_embeddings] = old.weight
            grown.weight[old.num_embeddings:] = old.weight.mean(0)  # ids between the old size and ours, if any
            grown.weight[ids] = vectors.to(old.weight)
        grown.requires_grad_(old.weight.requires_grad)
        owner = next(n for n, m in pipe.text_encoder.named_modules() if m is old)
        parent, attr, _ = module_slot(pipe, f"text_encoder.{owner}.weight")
        patch.set_attr(pipe, "tokenizer", tokenizer)
        patch.set_attr(parent, attr, grown)
        patch.set_attr(pipe.text_encoder.config, "vocab_size", len(tokenizer))
        return ids

    @classmethod
    def lora_key(cls, name: str) -> str:
        """kohya's key of a weight: 'unet.a.b.weight' -> 'lora_unet_a_b'. Text encoder keys keep the `text_model.`
        that transformers 5 dropped: A1111/ComfyUI expect it."""
        component, _, rest = name.partition(".")
        prefix = cls.lora_prefixes.get(component)
        if prefix is None:
            raise StudioError(f"{name}: only unet and text_encoder weights can go into a LoRA")
        if component == "text_encoder" and not rest.startswith("text_model."):
            rest = "text_model." + rest
        return prefix + rest.rpartition(".")[0].replace(".", "_")

    def lora_weights(self) -> dict[str, str]:
        """kohya key -> weight name of every Linear and Conv2d a LoRA may change (not peft's own layers)."""
        out = {}
        for component in self.lora_prefixes:
            for n, m in getattr(self.pipe, component).named_modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)) and ".base_layer" not in n and ".lora_" not in n:
                    out.setdefault(self.lora_key(f"{component}.{n}.weight"), f"{component}.{n}.weight")
        return out

    def lora_from_file(self, state: dict, what: str) -> dict:
        """A kohya LoRA's tensors keyed as `lora_weights` names them (`lora_te1_` and original block names read)."""
        if any(k.startswith("lora_te2_") for k in state):
            raise StudioError(f"{what} is an SDXL LoRA (two text encoders): it is for another architecture")
        state = {re.sub(r"^lora_te1_", "lora_te_", k): v for k, v in state.items() if torch.is_tensor(v)}
        if any(p in k for k in state for p in ("input_blocks", "middle_block", "output_blocks")):
            from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

            try:
                state = _maybe_map_sgm_blocks_to_diffusers(dict(state), self.pipe.unet.config)
            except (ValueError, IndexError, KeyError) as exc:
                raise StudioError(f"{what}: its original-SD block names do not fit this UNet ({exc}): it is for "
                                  "another architecture") from None
            renames = (("_input_blocks_", "_down_blocks_"), ("_middle_block_", "_mid_block_"),
                       ("_output_blocks_", "_up_blocks_"))
            for a, b in renames:  # the block indices are mapped above, the names are left to us
                state = {k.replace(a, b, 1): v for k, v in state.items()}
        return state

    def custom_diffusion_keys(self) -> dict[str, dict[str, str]]:
        """Per attention processor (all: diffusers' loader sets them at once), the keys of Custom Diffusion files
        ('<processor>.to_k_custom_diffusion.weight') -> the weights they replace ('unet.<attention>.to_k.weight')."""
        parts = {p.replace(".", "_custom_diffusion.", 1): p for p in ("to_k.weight", "to_v.weight", "to_q.weight",
                                                                       "to_out.0.weight", "to_out.0.bias")}
        return {proc: {f"{proc}.{cd}": f"unet.{proc.removesuffix('.processor')}.{part}" for cd, part in parts.items()}
                for proc in self.attention_sites()}
