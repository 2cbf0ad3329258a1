"""Stable-Diffusion-architecture pipelines built from configs with seeded random weights: the built-in model
when no toy model is bundled (real code paths, but it knows nothing), and SD-1.5's real cost for benchmarks."""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from .tokenizer import build_clip_tokenizer

TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=128, intermediate_size=512, num_hidden_layers=3,
    num_attention_heads=4, max_position_embeddings=77, projection_dim=128,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(64, 128, 128), attention_head_dim=4, cross_attention_dim=128,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
VAE_CONFIG = dict(
    sample_size=64, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
    block_out_channels=(32, 64, 64), norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
)
# The SD-1.x architecture (CLIP ViT-L/14 text encoder, 860M UNet, 84M VAE)
SD15_TEXT_CONFIG = dict(TEXT_CONFIG, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu")
SD15_UNET_CONFIG = dict(UNET_CONFIG, sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                        attention_head_dim=8, cross_attention_dim=768,
                        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE_CONFIG = dict(VAE_CONFIG, sample_size=512, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
                       down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
ARCHITECTURES = {"tiny": (TEXT_CONFIG, UNET_CONFIG, VAE_CONFIG), "sd15": (SD15_TEXT_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG)}
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def build_demo_pipeline(seed: int = 0, arch: str = "tiny") -> StableDiffusionPipeline:
    """A random-weight pipeline: "tiny" (the demo model, 64x64 images) or "sd15" (for benchmarks)."""
    text_config, unet_config, vae_config = ARCHITECTURES[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
    return StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=build_clip_tokenizer(), unet=unet.eval(),
        scheduler=DPMSolverMultistepScheduler(**SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
