"""The model layer: everything that depends on the architecture, one module per model family.

Methods never reach into `pipe.unet`, `pipe.text_encoder` or `pipe.vae` for what a family defines;
they ask `models.of(pipe)` for a family object bound to the pipeline and use its interface:

| what                                  | SD-1.x/2.x (sd.py, here now)                 |
|---------------------------------------|-----------------------------------------------|
| `load(source, kind, dtype)`           | StableDiffusionPipeline from folder/file/hub  |
| `tokenizers` / `text_encoders`        | one CLIP tokenizer and encoder                |
| `token_ids(prompts)`                  | padded ids of the (first) tokenizer           |
| `encode(prompts)` -> Conditioning     | embeds (B, 77, d); no pooled vector           |
| `text_projections()`                  | every `attn2.to_k` / `attn2.to_v` Linear      |
| `attention_sites()`                   | every diffusers `Attention`, cross or self    |
| `encode_images` / `decode_latents`    | AutoencoderKL, posterior mean x scaling       |
| `predict(x, t, cond)`                 | `unet(x, t, encoder_hidden_states=...)`       |
| `denoise(...)`                        | the family's diffusers pipeline call: THE loop |
| `lora_key(name)` / `lora_weights()`   | kohya `lora_unet_...` / `lora_te_...` <-> names |
| `lora_from_file(state, what)`         | SD-1 files' `lora_te1_`, original block names |
| `custom_diffusion_keys()`             | diffusers' Custom Diffusion keys -> weights   |
| `token_tables()`                      | the text encoder's input embedding table      |
| `install_tokens(token, vectors, p)`   | new rows in it and the tokenizer, via Patch p |
| `default_size`, `latent_shape(h, w)`  | sample_size x vae_scale_factor                |

How the next families fill it (each is one more module and a toy model, no change above this layer):
- SDXL (`sdxl.py`): two tokenizers and text encoders; `encode` concatenates both encoders' penultimate
  states (768 + 1280) into `embeds` and carries the second encoder's pooled output in `pooled` and the
  size/crop time ids in `extra["time_ids"]`; `predict` passes them as `added_cond_kwargs`; new tokens go
  into both embedding tables; `text_projections` are the same attn2 K/V (input 2048); kohya keys are
  `lora_unet_...`, `lora_te1_...`, `lora_te2_...`; `denoise` calls StableDiffusionXLPipeline with
  `pooled_prompt_embeds` / `negative_pooled_prompt_embeds`; default size 1024.
- Flux-class diffusion transformers (`dit.py`): a CLIP encoder for `pooled` and a T5-style encoder for
  `embeds` (512 tokens); text and image tokens meet in one joint attention, so `attention_sites` are the
  transformer blocks' `attn` (the text-to-image part of the joint attention map is the "cross" map) and
  `text_projections` are each block's `add_k_proj` / `add_v_proj` (the text stream's K/V); latents are
  packed 2x2 patches and `encode_images` / `decode_latents` pack and unpack them with the VAE's shift and
  scale; `predict` calls the transformer with `txt_ids` / `img_ids` and the guidance embedding; `denoise`
  calls FluxPipeline (flow matching: FlowMatchEulerDiscreteScheduler, the target is noise - x0).
"""
from __future__ import annotations

from .sd import Conditioning, StableDiffusion

FAMILIES = (StableDiffusion,)


def of(pipe) -> StableDiffusion:
    """The family object for `pipe`: the one place the studio asks what architecture it runs."""
    for family in FAMILIES:
        if family.matches(pipe):
            return family(pipe)
    raise TypeError(f"{type(pipe).__name__} is not a model family the studio knows "
                    f"({', '.join(f.title for f in FAMILIES)})")


__all__ = ["Conditioning", "FAMILIES", "StableDiffusion", "of"]
