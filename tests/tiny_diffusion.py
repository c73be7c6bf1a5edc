"""Tiny diffusion models built from configs (no network, seconds on a CPU): a Stable Diffusion pipeline
(16-pixel images, 8x8x4 latents) and a CLIP model, both with a CLIP tokenizer of the shapes world."""

from __future__ import annotations

from pathlib import Path

TINY_SIZE = 16


def build_tiny_sd(directory: Path, seed: int = 0) -> Path:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from raft.modalities.diffusion.world import build_clip_tokenizer

    directory = Path(directory)
    tokenizer = build_clip_tokenizer(directory.with_name(directory.name + "-tokenizer"))
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=TINY_SIZE)
    unet = UNet2DConditionModel(
        sample_size=TINY_SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(directory)
    return Path(directory)


def build_tiny_clip(directory: Path, seed: int = 0, projection_dim: int = 16) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from raft.modalities.diffusion.world import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(directory)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(image_size=TINY_SIZE, patch_size=4, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=projection_dim)
    CLIPModel(config).save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": TINY_SIZE}, crop_size={"height": TINY_SIZE, "width": TINY_SIZE},
                       image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(directory)
    return Path(directory)


def tiny_diffusion_overrides(sd_dir: Path, clip_dir: Path, run_dir: Path) -> list[str]:
    """A full diffusion RAFT run on the tiny models in seconds."""
    return [
        "--modality", "diffusion",
        f"model.name_or_path={sd_dir}",
        f"rankers.0.model={clip_dir}",
        f"run_dir={run_dir}",
        "iterations=2",
        "prompts_per_iteration=2",
        "samples_per_prompt=3",
        "data.eval_size=2",
        "eval.samples_per_prompt=2",
        "generation.num_inference_steps=3",
        "generation.batch_size=4",
        "finetune.batch_size=2",
        "finetune.epochs=2",
        "finetune.learning_rate=1e-2",
    ]
