"""The paper setting's model architectures, built from their configs with random weights: what
the planner counts FLOPs on (meta device) and the benchmarks time (speed and memory do not
depend on weight values). Imports only torch, transformers and diffusers, so a GPU machine
without the pipeline's other dependencies can run the benchmarks."""
from __future__ import annotations


def vit_l14_config():
    """OpenAI CLIP ViT-L/14's architecture (``openai/clip-vit-large-patch14``): the paper's
    filter and SD v1.4's text encoder."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                           num_attention_heads=16, image_size=224, patch_size=14),
        projection_dim=768)


def sd_v14_unet_and_vae(size: int = 512):
    """Stable Diffusion v1.4's UNet and VAE architecture (``CompVis/stable-diffusion-v1-4``),
    built with random weights on the current default device (meta: no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=size // 8, cross_attention_dim=768, attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4)
    return unet, vae
