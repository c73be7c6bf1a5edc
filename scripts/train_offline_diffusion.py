"""Trains raft's offline diffusion default from scratch on the shapes world (raft/modalities/diffusion/world.py).

    python scripts/train_offline_diffusion.py                 # everything, then writes the package assets
    python scripts/train_offline_diffusion.py --steps-scale 0.05 --out /tmp/assets   # a quick smoke run

Up to five stages, each cached in --work-dir so a killed run picks up after its last finished stage:

1. tokenizer: a CLIP BPE tokenizer whose vocabulary holds every word of the world.
2. clip:      a small CLIPModel (ViT 32 px, patch 8), contrastive on images and their captions with hard
              negatives (wrong colour, shape, relation, binding), so it judges composition, not only words.
3. vae:       a small AutoencoderKL, 32x32x3 pixels <-> 8x8x4 latents (MSE + a tiny KL term).
4. denoiser:  a small UNet2DConditionModel and CLIP text encoder trained together from scratch (epsilon
              prediction on the VAE latents, 10% empty captions for classifier-free guidance, EMA weights);
              the text encoder is not the judging CLIP's, so policy and reward share no weights. Only 15% of
              its images show two objects (--pair-share), so it follows two-object prompts poorly, as models
              trained on web data follow compositional prompts: that is what RAFT then improves. Trained on
              75%, it followed them as well as its data allowed, and RAFT had nothing to add (see the README).
5. noisy_captions (only with --caption-noise > 0): the denoiser trained further on images of which that share
              carries a wrong caption (a hard negative), as web captions do, so the model follows its prompts
              only partly. An experiment: RAFT did not raise the held-out CLIP score of those models either
              (see the README), so the shipped model skips this stage.

The outputs are a StableDiffusionPipeline folder (`shapes-sd`) and a CLIP folder (`shapes-clip`) in
--out (default: raft/modalities/diffusion/assets), plus `training.json` with the settings and the figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from raft.modalities.diffusion import world  # noqa: E402

CLIP_MEAN, CLIP_STD = 0.5, 0.5  # pixels in [0, 1] -> [-1, 1], as the saved image processor does


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "raft/modalities/diffusion/assets"), help="where shapes-sd/ and shapes-clip/ go")
    p.add_argument("--work-dir", default=str(Path.home() / ".cache/raft/train-offline-diffusion"), help="stage cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiplies every stage's step count (smoke runs)")
    p.add_argument("--clip-steps", type=int, default=4000)
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--unet-steps", type=int, default=3000)
    p.add_argument("--unet-pool", type=int, default=40000, help="images rendered and encoded once for the UNet")
    p.add_argument("--pair-share", type=float, default=0.15,
                   help="share of two-object scenes among the denoiser's training images (the rest show one object)")
    p.add_argument("--caption-noise", type=float, default=0.0,
                   help="share of miscaptioned images in an extra last stage (0, the shipped model: no such stage)")
    p.add_argument("--noisy-steps", type=int, default=600, help="steps of the miscaptioned stage")
    p.add_argument("--snapshots", default="",
                   help="comma-separated denoiser steps at which its EMA weights are also saved, in "
                        "WORK_DIR/denoiser-step-N (bases stopped early: how far the base is trained sets how far "
                        "fine-tuning can move it)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                   help="bfloat16 autocast on CPU (weights and losses stay float32)")
    p.add_argument("--stages", default="", help="comma-separated stages to run, e.g. clip or vae,denoiser (the "
                   "denoiser needs the vae); default: all, then the assets are written")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (0: torch's default). 1 by default: on a shared 2-core machine, two OpenMP "
                        "threads per process ran a UNet step 10x slower than one")
    return p.parse_args(argv)


def log(stage: str, message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {stage}: {message}", flush=True)


def to_tensor(images) -> torch.Tensor:
    """uint8 NHWC array -> float NCHW in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def render(count: int, rng: np.random.Generator, pair_share: float = 0.75) -> tuple[np.ndarray, list[world.Scene]]:
    scenes = [world.random_scene(rng, pair_share) for _ in range(count)]
    return world.images_to_array([world.draw(s, rng) for s in scenes]), scenes


def autocast(args):
    return torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else nullcontext()


def cosine_lr(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------
# 1. tokenizer


def stage_tokenizer(work: Path):
    from transformers import CLIPTokenizer

    folder = work / "tokenizer"
    if not (folder / "vocab.json").is_file():
        world.build_clip_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(folder)


# ----------------------------------------------------------------------------------------------
# 2. CLIP


def clip_config(tokenizer):
    from transformers import CLIPConfig

    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=world.SIZE, patch_size=8, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                  num_attention_heads=4, num_channels=3)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def stage_clip(work: Path, tokenizer, args) -> dict:
    from transformers import CLIPModel

    folder = work / "clip"
    if (folder / "model.safetensors").is_file():
        return json.loads((folder / "stats.json").read_text())
    steps = max(1, int(args.clip_steps * args.steps_scale))
    torch.manual_seed(args.seed)
    rng = np.random.default_rng([args.seed, 2])
    model = CLIPModel(clip_config(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, steps, 100))
    batch, negatives_per_image = 64, 2
    started = time.perf_counter()
    model.train()
    for step in range(steps):
        images, scenes = render(batch, rng)
        captions = [s.caption for s in scenes]
        negatives = []
        for scene in scenes:
            options = world.hard_negatives(scene, rng)
            negatives += [options[i] for i in rng.permutation(len(options))[:negatives_per_image]]
        pixels = to_tensor(images)
        with autocast(args):
            out = model(input_ids=tokenize(tokenizer, captions + negatives), pixel_values=pixels)
        logits = out.logits_per_image.float()  # batch x (batch + negatives)
        labels = torch.arange(batch)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, :batch].T, labels)) / 2
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            log("clip", f"step {step + 1}/{steps} loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)")
    model.eval()
    stats = {"steps": steps, "seconds": round(time.perf_counter() - started), **clip_accuracy(model, tokenizer, args.seed)}
    log("clip", f"held-out: {stats}")
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    (folder / "stats.json").write_text(json.dumps(stats, indent=1))
    return stats


def features(output) -> torch.Tensor:
    """get_*_features return a tensor in transformers 4 and an output with pooler_output in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def clip_embed(model, tokenizer, images: np.ndarray | None = None, captions: list[str] | None = None):
    result = []
    if images is not None:
        result.append(F.normalize(features(model.get_image_features(pixel_values=to_tensor(images))), dim=-1))
    if captions is not None:
        result.append(F.normalize(features(model.get_text_features(input_ids=tokenize(tokenizer, captions))), dim=-1))
    return result


@torch.no_grad()
def clip_accuracy(model, tokenizer, seed: int, count: int = 512) -> dict:
    """How often CLIP ranks an image's caption above each of its hard negatives, on fresh images."""
    rng = np.random.default_rng([seed, 99])
    images, scenes = render(count, rng, pair_share=1.0)
    (image_emb,) = clip_embed(model, tokenizer, images=images)
    wins, total, scores = 0, 0, []
    for i, scene in enumerate(scenes):
        texts = [scene.caption] + world.hard_negatives(scene, rng)
        (text_emb,) = clip_embed(model, tokenizer, captions=texts)
        sims = (100 * image_emb[i] @ text_emb.T).tolist()
        scores.append(sims[0])
        wins += sum(sims[0] > s for s in sims[1:])
        total += len(sims) - 1
    return {"hard_negative_accuracy": round(wins / total, 4), "clip_score_of_real_images": round(float(np.mean(scores)), 3)}


# ----------------------------------------------------------------------------------------------
# 3. VAE


def vae_model():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64),
                         layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=world.SIZE)


def stage_vae(work: Path, args) -> dict:
    from diffusers import AutoencoderKL

    folder = work / "vae"
    if (folder / "config.json").is_file():
        return json.loads((folder / "stats.json").read_text())
    steps = max(1, int(args.vae_steps * args.steps_scale))
    torch.manual_seed(args.seed)
    rng = np.random.default_rng([args.seed, 3])
    vae = vae_model()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, steps, 50))
    started = time.perf_counter()
    vae.train()
    for step in range(steps):
        images, _ = render(64, rng)
        x = to_tensor(images)
        with autocast(args):
            posterior = vae.encode(x).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample.float()
        mse = F.mse_loss(reconstruction, x)
        loss = mse + F.l1_loss(reconstruction, x) + 1e-6 * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            log("vae", f"step {step + 1}/{steps} mse {mse.item():.5f} ({time.perf_counter() - started:.0f} s)")
    vae.eval()
    with torch.no_grad():
        images, _ = render(256, np.random.default_rng([args.seed, 98]))
        x = to_tensor(images)
        latents = vae.encode(x).latent_dist.mean
        mse = F.mse_loss(vae.decode(latents).sample.clamp(-1, 1), x).item()
        std = latents.std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))  # unit-variance latents, as SD's 0.18215 does
    stats = {"steps": steps, "seconds": round(time.perf_counter() - started), "held_out_mse": round(mse, 6),
             "scaling_factor": vae.config.scaling_factor}
    log("vae", f"held-out: {stats}")
    vae.save_pretrained(folder)
    (folder / "stats.json").write_text(json.dumps(stats, indent=1))
    return stats


# ----------------------------------------------------------------------------------------------
# 4. UNet


def unet_model(cross_attention_dim: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=world.SIZE // 4, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8)


def noise_schedulers():
    from diffusers import DDIMScheduler, DDPMScheduler

    betas = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return (DDPMScheduler(**betas, clip_sample=False),
            DDIMScheduler(**betas, clip_sample=False, set_alpha_to_one=False, steps_offset=1))


def text_encoder_model(tokenizer):
    """Stable Diffusion's conditioning is a CLIP text encoder; this one is trained with the UNet, from scratch,
    so the policy shares no weights with the CLIP model that judges it."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def encode_pool(vae, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the VAE posterior of every image (latents are re-sampled each step)."""
    with torch.no_grad():
        moments = torch.cat([vae.encode(to_tensor(images[i : i + 256])).latent_dist.parameters
                             for i in range(0, len(images), 256)])
    mean, logvar = moments.chunk(2, dim=1)
    return mean, torch.exp(0.5 * logvar.clamp(-30, 20))


def stage_denoiser(work: Path, tokenizer, args) -> dict:
    """UNet and text encoder, trained together on VAE latents; EMA weights are saved. Resumable every 250 steps."""
    from diffusers import AutoencoderKL

    folder = work / "denoiser"
    if (folder / "stats.json").is_file():
        stats = json.loads((folder / "stats.json").read_text())
        cached = stats.get("pair_share", 0.75)  # denoisers cached before --pair-share existed used 0.75
        if cached != args.pair_share:
            raise SystemExit(f"--pair-share {args.pair_share}: the denoiser cached in {folder} was trained with "
                             f"{cached}; pass another --work-dir or remove that folder")
        return stats
    steps = max(1, int(args.unet_steps * args.steps_scale))
    pool_size = max(256, int(args.unet_pool * min(1.0, args.steps_scale * 4)))
    vae = AutoencoderKL.from_pretrained(work / "vae").eval()
    log("unet", f"rendering and encoding {pool_size} images")
    rng = np.random.default_rng([args.seed, 4])
    images, scenes = render(pool_size, rng, args.pair_share)
    torch.manual_seed(args.seed)
    text_encoder = text_encoder_model(tokenizer)
    models = torch.nn.ModuleDict({"unet": unet_model(text_encoder.config.hidden_size), "text_encoder": text_encoder})
    stats = train_denoiser("unet", models, vae, images, [s.caption for s in scenes], tokenizer, steps, 5e-4,
                           work / "denoiser-partial.pt", args)
    stats["pair_share"] = args.pair_share
    save_denoiser(stats, folder)
    return stats


def stage_noisy_captions(work: Path, tokenizer, args) -> dict:
    """The denoiser, trained on captions of which a share (--caption-noise) is wrong in one respect.

    Web-scale captions are noisy, and models trained on them follow prompts only partly: that is what a
    prompt-image agreement reward corrects, and what RAFT is for. Trained on exact captions only, the shapes
    model follows its prompts as well as its data do, so fine-tuning on its own best images teaches it nothing
    its data did not. Here every corrupted caption is one of the scene's hard negatives (wrong relation,
    objects swapped, wrong colour, shape or binding), fixed per image like a web caption."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = work / "denoiser-noisy"
    if (folder / "stats.json").is_file():
        return json.loads((folder / "stats.json").read_text())
    steps = max(1, int(args.noisy_steps * args.steps_scale))
    pool_size = max(256, int(args.unet_pool // 2 * min(1.0, args.steps_scale * 4)))
    vae = AutoencoderKL.from_pretrained(work / "vae").eval()
    log("noisy", f"rendering and encoding {pool_size} images, {args.caption_noise:.0%} of them miscaptioned")
    rng = np.random.default_rng([args.seed, 5])
    images, scenes = render(pool_size, rng)
    captions = [str(rng.choice(world.hard_negatives(s, rng))) if rng.random() < args.caption_noise else s.caption
                for s in scenes]
    models = torch.nn.ModuleDict({"unet": UNet2DConditionModel.from_pretrained(work / "denoiser" / "unet"),
                                  "text_encoder": CLIPTextModel.from_pretrained(work / "denoiser" / "text_encoder")})
    stats = train_denoiser("noisy", models, vae, images, captions, tokenizer, steps, 2e-4,
                           work / "denoiser-noisy-partial.pt", args)
    stats["caption_noise"] = args.caption_noise
    save_denoiser(stats, folder)
    return stats


def save_denoiser(stats: dict, folder: Path) -> None:
    ema = stats.pop("ema")
    ema["unet"].save_pretrained(folder / "unet")
    ema["text_encoder"].save_pretrained(folder / "text_encoder")
    (folder / "stats.json").write_text(json.dumps(stats, indent=1))


def train_denoiser(name: str, models: torch.nn.ModuleDict, vae, images: np.ndarray, image_captions: list[str],
                   tokenizer, steps: int, lr: float, partial: Path, args) -> dict:
    """Epsilon-prediction training with 10% empty captions (for classifier-free guidance) and EMA weights."""
    mean, std = encode_pool(vae, images)
    captions = sorted(set(image_captions) | {""})
    caption_index = {c: i for i, c in enumerate(captions)}
    token_table = tokenize(tokenizer, captions)
    labels = torch.tensor([caption_index[c] for c in image_captions])
    empty, pool_size = caption_index[""], len(images)

    ema = copy.deepcopy(models)
    ema.requires_grad_(False)
    train_scheduler, _ = noise_schedulers()
    alphas = train_scheduler.alphas_cumprod
    optimizer = torch.optim.AdamW(models.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, steps, 100))
    generator = torch.Generator().manual_seed(args.seed)
    first = 0
    if partial.is_file():
        state = torch.load(partial, weights_only=True)
        models.load_state_dict(state["models"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        first = state["step"]
        log(name, f"resuming after step {first}")
    batch, started = 64, time.perf_counter()
    models.train()
    for step in range(first, steps):
        index = torch.randint(pool_size, (batch,), generator=generator)
        latents = (mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)) * vae.config.scaling_factor
        condition = labels[index].clone()
        condition[torch.rand(batch, generator=generator) < 0.1] = empty
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, len(alphas), (batch,), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        with autocast(args):
            text_states = models["text_encoder"](token_table[condition])[0]
            prediction = models["unet"](noisy, t, text_states).sample
        loss = F.mse_loss(prediction.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), models.parameters()):
                e.lerp_(p, 1 - decay)
        if step % 100 == 0 or step == steps - 1:
            log(name, f"step {step + 1}/{steps} loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)")
        if str(step + 1) in args.snapshots.split(",") and name == "unet":
            snapshot = partial.parent / f"denoiser-step-{step + 1}"
            for key in ("unet", "text_encoder"):
                ema[key].save_pretrained(snapshot / key)
            (snapshot / "stats.json").write_text(json.dumps({"steps": step + 1, "of": steps, "pool": pool_size,
                                                             "pair_share": args.pair_share}, indent=1))
            log(name, f"snapshot of the EMA weights at step {step + 1}: {snapshot}")
        if (step + 1) % 250 == 0 and step + 1 < steps:
            torch.save({"models": models.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "generator": generator.get_state(), "step": step + 1},
                       partial.with_suffix(".tmp"))
            partial.with_suffix(".tmp").replace(partial)
    partial.unlink(missing_ok=True)
    return {"steps": steps, "pool": pool_size, "seconds": round(time.perf_counter() - started), "ema": ema}


# ----------------------------------------------------------------------------------------------
# assembling the assets


def assemble(work: Path, out: Path, tokenizer, noisy: bool) -> None:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPModel

    out.mkdir(parents=True, exist_ok=True)
    clip = CLIPModel.from_pretrained(work / "clip").eval()
    processor = CLIPImageProcessor(do_resize=True, size={"shortest_edge": world.SIZE}, do_center_crop=True,
                                   crop_size={"height": world.SIZE, "width": world.SIZE}, do_rescale=True,
                                   do_normalize=True, image_mean=[CLIP_MEAN] * 3, image_std=[CLIP_STD] * 3)
    for name, save in [("shapes-clip", lambda d: (clip.save_pretrained(d), processor.save_pretrained(d))),
                       ("shapes-sd", lambda d: pipeline(work, tokenizer, noisy).save_pretrained(d))]:
        tmp = out / f"{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save(tmp)
        if name == "shapes-clip":
            copy_tokenizer(work / "tokenizer", tmp)
        else:
            copy_tokenizer(work / "tokenizer", tmp / "tokenizer")
        shutil.rmtree(out / name, ignore_errors=True)
        tmp.rename(out / name)


def copy_tokenizer(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        shutil.copy(file, target / file.name)


def pipeline(work: Path, tokenizer, noisy: bool):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    _, inference_scheduler = noise_schedulers()
    denoiser = work / ("denoiser-noisy" if noisy else "denoiser")
    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(work / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(denoiser / "text_encoder"), tokenizer=tokenizer,
        unet=UNet2DConditionModel.from_pretrained(denoiser / "unet"), scheduler=inference_scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@torch.no_grad()
def evaluate_assets(out: Path, work: Path, seed: int, prompts: int = 32, per_prompt: int = 4) -> dict:
    """Base-model figures on held-out two-object prompts: CLIP score, and how often CLIP prefers the prompt
    over each of its hard negatives, at a few guidance scales."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel, CLIPTokenizer

    pipe = StableDiffusionPipeline.from_pretrained(out / "shapes-sd")
    pipe.set_progress_bar_config(disable=True)
    clip = CLIPModel.from_pretrained(out / "shapes-clip").eval()
    tokenizer = CLIPTokenizer.from_pretrained(out / "shapes-clip")
    _, held_out = world.alignment_prompts(eval_size=prompts)
    rng = np.random.default_rng([seed, 97])
    results = {}
    for guidance in (1.0, 3.0, 5.0):
        batch = [p for p in held_out for _ in range(per_prompt)]
        generators = [torch.Generator().manual_seed(1000 + i) for i in range(len(batch))]
        images = pipe(batch, height=world.SIZE, width=world.SIZE, num_inference_steps=20, guidance_scale=guidance,
                      generator=generators, output_type="np").images
        images = (images * 255).round().astype(np.uint8)
        image_emb, text_emb = clip_embed(clip, tokenizer, images=images, captions=batch)
        scores = (100 * (image_emb * text_emb).sum(-1)).tolist()
        wins = total = 0
        for i, prompt in enumerate(batch):
            negatives = world.hard_negatives(world.parse(prompt), rng)
            (neg_emb,) = clip_embed(clip, tokenizer, captions=negatives)
            wins += int((100 * image_emb[i] @ neg_emb.T < scores[i]).sum())
            total += len(negatives)
        results[f"guidance_{guidance:g}"] = {"clip_score": round(float(np.mean(scores)), 3),
                                             "hard_negative_accuracy": round(wins / total, 4)}
        save_grid(images[: 8 * per_prompt], per_prompt, work / f"base-grid-g{guidance:g}.png")
    return results


def save_grid(images: np.ndarray, columns: int, path: Path) -> None:
    from PIL import Image

    rows = math.ceil(len(images) / columns)
    h, w = images.shape[1:3]
    grid = np.zeros((rows * h, columns * w, 3), np.uint8)
    for i, image in enumerate(images):
        grid[(i // columns) * h : (i // columns + 1) * h, (i % columns) * w : (i % columns + 1) * w] = image
    Image.fromarray(grid).save(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work, out = Path(args.work_dir).expanduser(), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tokenizer = stage_tokenizer(work)
    stages = {"clip": lambda: stage_clip(work, tokenizer, args), "vae": lambda: stage_vae(work, args),
              "denoiser": lambda: stage_denoiser(work, tokenizer, args),
              "noisy_captions": lambda: stage_noisy_captions(work, tokenizer, args)}
    wanted = args.stages.split(",") if args.stages else [s for s in stages if s != "noisy_captions" or args.caption_noise > 0]
    unknown = [s for s in wanted if s not in stages]
    if unknown:
        raise SystemExit(f"--stages: unknown stage {unknown[0]} ({', '.join(stages)})")
    figures = {name: stages[name]() for name in wanted}
    if args.stages:  # a part of the work, e.g. two stages in two processes; run again without --stages to finish
        return 0
    assemble(work, out, tokenizer, noisy=args.caption_noise > 0)
    figures["base_model_held_out"] = evaluate_assets(out, work, args.seed)
    log("done", json.dumps(figures["base_model_held_out"]))
    summary = {"settings": {k: v for k, v in vars(args).items() if k not in ("out", "work_dir")},
               "torch": torch.__version__, "figures": figures, "seconds": round(time.perf_counter() - started)}
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
