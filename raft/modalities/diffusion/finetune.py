"""Fine-tuning on the kept images with the standard text-to-image denoising loss.

For each kept (prompt, image): encode the image with the frozen VAE, draw a timestep t uniformly and noise,
and regress the UNet's prediction at the noised latent onto the noise (or the velocity, for v-prediction
models), conditioned on the frozen text encoder's embedding of the prompt. VAE moments and text embeddings
are computed once per iteration; the VAE latent is re-sampled from its moments at every step.

With `finetune.anchor` > 0 the loss adds a pull toward the starting model: the mean squared difference between
the UNet's prediction and the starting UNet's on the same noisy latent, timestep and caption. Between two Gaussian
denoising steps of equal variance the KL is proportional to that squared difference, so summed over the steps it
bounds the KL between the two samplers (DPOK, Fan et al. 2023): the diffusion counterpart of the text modality's KL
to the start.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from raft.errors import RaftError
from raft.finetune import distributed
from raft.finetune.trainer import Trainer, TrainerSettings
from raft.interface import FineTuner, Sample
from raft.modalities.diffusion.config import DiffusionFinetuneConfig
from raft.modalities.diffusion.model import DiffusionPolicy, save_policy


def image_tensor(images, size: int) -> torch.Tensor:
    """PIL images -> float NCHW in [-1, 1] at `size` x `size`: another size is resized (bicubic), its shorter side
    to `size`, and a non-square one centre-cropped (the usual Stable Diffusion preprocessing)."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (size, size):
            scale = size / min(image.size)
            width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
            image = image.resize((width, height), resample=3)  # bicubic
            left, top = (width - size) // 2, (height - size) // 2
            image = image.crop((left, top, left + size, top + size))
        arrays.append(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


class DiffusionFineTuner(FineTuner):
    def __init__(self, policy: DiffusionPolicy, config: DiffusionFinetuneConfig, checkpoint: Path | None,
                 progress: bool = True, resolution: int | None = None, start_unet: torch.nn.Module | None = None):
        """`start_unet`: the starting UNet, frozen, which `config.anchor` pulls toward when the whole UNet is trained
        (with LoRA the start is the UNet with its adapter switched off, and this stays None)."""
        from diffusers import DDPMScheduler

        self.policy, self.config, self.progress = policy, config, progress
        if config.anchor > 0 and not policy.lora and start_unet is None:
            raise ValueError("finetune.anchor on the whole UNet needs the starting UNet (start_unet)")
        self.start_unet = start_unet
        # the size every kept image is trained at: the sampling resolution (generation.resolution, else the model's
        # own), whatever size a file generator's images have
        self.resolution = resolution or policy.default_resolution()
        # the forward (noising) process of training: the pipeline's betas, whatever scheduler samples
        self.noise_scheduler = DDPMScheduler.from_config(policy.pipeline.scheduler.config)
        if config.gradient_checkpointing:
            policy.unet.enable_gradient_checkpointing()
        if not policy.trainable_parameters():
            raise RaftError("finetune: the UNet has no trainable parameters (check finetune.lora.target_modules)")
        self.trainer = Trainer(policy.unet, TrainerSettings.from_finetune_config(config), checkpoint, policy.device)

    @property
    def optimizer(self):
        """The AdamW state carried across iterations (None when each iteration starts afresh)."""
        return self.trainer.optimizer if self.config.carry_optimizer_state and self.trainer.started else None

    @torch.no_grad()
    def encode(self, selected: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """(VAE latent moments, text embeddings) of the kept samples, computed once per iteration."""
        policy, vae = self.policy, self.policy.pipeline.vae
        size = self.resolution
        moments, texts = [], []
        for start in range(0, len(selected), 16):
            chunk = selected[start : start + 16]
            pixels = image_tensor([s.output for s in chunk], size).to(policy.device, vae.dtype)
            moments.append(vae.encode(pixels).latent_dist.parameters.float())
            texts.append(policy.encode_prompts([s.prompt for s in chunk]))
        return torch.cat(moments), torch.cat(texts)

    def draw(self, generator: torch.Generator, rows: int, latent_shape: tuple[int, ...],
             dropout: bool) -> dict[str, torch.Tensor]:
        """The random draws of one micro-batch of `rows` images, in the order the loss has always drawn them (so a
        one-process run draws the same stream as before): which rows lose their caption, the VAE latent sample,
        the noise, the timesteps. Row i of each belongs to the micro-batch's image i, wherever it is trained."""
        draws = {}
        if dropout:
            draws["dropped"] = torch.rand(rows, generator=generator) < self.config.caption_dropout
        draws["latent"] = torch.randn((rows, *latent_shape), generator=generator)
        draws["noise"] = torch.randn((rows, *latent_shape), generator=generator)
        total = self.noise_scheduler.config.num_train_timesteps
        low, high = (round(f * total) for f in self.config.timestep_range)
        draws["timesteps"] = torch.randint(low, max(high, low + 1), (rows,), generator=generator)
        return draws

    def loss(self, moments: torch.Tensor, text: torch.Tensor, draws: dict[str, torch.Tensor] | torch.Generator,
             empty: torch.Tensor | None = None) -> torch.Tensor:
        """The training loss of one micro-batch: the denoising loss, plus `anchor` x the drift from the start."""
        return self.loss_terms(moments, text, draws, empty)["loss"]

    def loss_terms(self, moments: torch.Tensor, text: torch.Tensor, draws: dict[str, torch.Tensor] | torch.Generator,
                   empty: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`denoise`: the mean squared error of the UNet's noise (or velocity) prediction on one micro-batch, with
        that micro-batch's `draws` (CPU tensors, one row per image: the same draws on any device; a generator:
        drawn from it here); with `empty`, the rows drawn as `dropped` are conditioned on the empty prompt instead.
        `drift` (with an anchor): the mean squared difference from the starting UNet's prediction. `loss`: what is
        backpropagated (the metrics report `denoise` as train/loss, comparable with and without an anchor)."""
        policy, scheduler = self.policy, self.noise_scheduler
        if isinstance(draws, torch.Generator):
            draws = self.draw(draws, len(moments), (moments.shape[1] // 2, *moments.shape[2:]), empty is not None)
        device = policy.device
        if empty is not None:
            dropped = draws["dropped"].to(device)
            text = torch.where(dropped[:, None, None], empty.expand_as(text), text)
        vae_config = policy.pipeline.vae.config
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        latents = mean + std * draws["latent"].to(device)
        shift = getattr(vae_config, "shift_factor", None) or 0.0
        latents = (latents - shift) * vae_config.scaling_factor
        noise = draws["noise"].to(device)
        timesteps = draws["timesteps"].to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        with policy.autocast():
            prediction = self.trainer.model(noisy.to(policy.dtype), timesteps, text).sample
        denoise = F.mse_loss(prediction.float(), target.float())
        if not self.config.anchor:
            return {"loss": denoise, "denoise": denoise}
        start = self.start_prediction(noisy.to(policy.dtype), timesteps, text)
        drift = F.mse_loss(prediction.float(), start.float())
        return {"loss": denoise + self.config.anchor * drift, "denoise": denoise, "drift": drift}

    @torch.no_grad()
    def start_prediction(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The starting model's prediction: the frozen start UNet, or this UNet with its LoRA adapter switched off
        (the unwrapped module, outside the data-parallel wrapper: no gradient and no synchronisation)."""
        with self.policy.autocast():
            if self.start_unet is not None:
                return self.start_unet(noisy, timesteps, text).sample
            unet = self.trainer.unwrapped()
            unet.disable_adapters()
            try:
                return unet(noisy, timesteps, text).sample
            finally:
                unet.enable_adapters()

    def finetune(self, selected: list[Sample], seed: int) -> dict[str, float]:
        config, policy = self.config, self.policy
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        moments, texts = self.encode(selected)
        # Classifier-free guidance samples from uncond + w * (cond - uncond): training the conditional branch
        # alone lets the shared weights move the unconditional one unchecked, and guidance amplifies that drift
        # (w - 1)-fold. Training some rows on the empty prompt, as the base model was, keeps both in step.
        empty = None
        if config.caption_dropout > 0:
            with torch.no_grad():
                empty = policy.encode_prompts([""])
        trainer = self.trainer
        trainer.start()
        micro = config.batch_size // config.gradient_accumulation_steps
        steps = [order[i : i + config.batch_size]
                 for order in (torch.randperm(len(selected), generator=generator).tolist() for _ in range(config.epochs))
                 for i in range(0, len(selected), config.batch_size)]

        latent_shape = (moments.shape[1] // 2, *moments.shape[2:])

        def loss_of(positions, step, draws):
            index = torch.tensor([step[p] for p in positions])
            mine = {key: torch.stack([draws[p][key] for p in positions]) for key in draws[positions[0]]}
            terms = self.loss_terms(moments[index], texts[index], mine, empty)
            share = len(index) / len(step)
            metrics = {"train/loss": terms["denoise"].item() * share}
            if "drift" in terms:
                metrics["train/drift_from_start"] = terms["drift"].item() * share
            return terms["loss"] * share, metrics

        policy.unet.train()
        # the drift from the start, with an anchor: how far the predictions moved on the kept images
        keys = ["train/loss"] + (["train/drift_from_start"] if config.anchor else [])
        sums = dict.fromkeys(keys, 0.0)
        for step in tqdm(steps, desc=f"fine-tuning on {len(selected)}", disable=not self.progress, leave=False):
            # Every process draws the whole step's randomness as one process would (micro-batch by micro-batch)
            # and trains its share of the images with their own draws: the data-parallel step sums to the
            # one-process step, whatever the number of processes.
            positions = list(range(len(step)))
            draws = {}
            for j in range(0, len(step), micro):
                chunk = positions[j : j + micro]
                drawn = self.draw(generator, len(chunk), latent_shape, empty is not None)
                draws.update({p: {key: value[i] for key, value in drawn.items()} for i, p in enumerate(chunk)})
            chunks = [positions[j : j + micro] for j in range(0, len(step), micro)]
            if trainer.num_processes > 1:  # each process its share of the step's images
                mine = distributed.shard(positions)
                size = max(1, micro // trainer.num_processes)
                chunks = [mine[j : j + size] for j in range(0, len(mine), size)]
            metrics = trainer.accumulate(chunks, lambda chunk: loss_of(chunk, step, draws), [0])
            trainer.step()
            reduced = trainer.reduce(metrics, keys)
            for key in keys:
                sums[key] += reduced[key]
        policy.unet.eval()
        return {**{key: total / len(steps) if steps else math.nan for key, total in sums.items()},
                "train/steps": len(steps)}

    def save_checkpoint(self, directory: Path | None) -> None:
        self.trainer.model_state()  # collective under sharded training: every process takes part
        if directory is None:  # not the main process
            return
        save_policy(self.policy, directory)
        self.trainer.save_optimizer(directory)
