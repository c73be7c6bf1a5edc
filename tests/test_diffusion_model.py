"""The diffusion policy on a tiny Stable Diffusion pipeline built from configs and loaded by path: seeded
batched sampling, LoRA set-up, denoising fine-tuning, and checkpoints that load back with load_lora_weights."""

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from raft.errors import RaftError
from raft.interface import Sample
from raft.modalities.diffusion.config import DiffusionFinetuneConfig, DiffusionGenerationConfig, DiffusionLoraConfig, DiffusionModelConfig
from raft.modalities.diffusion.finetune import DiffusionFineTuner
from raft.modalities.diffusion.model import LORA_WEIGHTS, load_policy, save_policy
from raft.modalities.diffusion.sampler import DiffusionSampler, regenerate

from tiny_diffusion import TINY_SIZE

GENERATION = DiffusionGenerationConfig(num_inference_steps=3, guidance_scale=3.0, batch_size=4)
PROMPTS = ["a red circle above a blue square", "a green triangle"]


def policy_of(sd_dir, lora=True, checkpoint=None, seed=0, **model):
    config = DiffusionModelConfig(name_or_path=str(sd_dir), device="cpu", **model)
    return load_policy(config, DiffusionLoraConfig(enabled=lora), checkpoint, seed=seed)


def arrays(images):
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def trained(policy, seed=0, epochs=3):
    """A few fine-tuning steps on the policy's own samples, so the adapter is no longer a no-op."""
    samples = DiffusionSampler(policy, GENERATION, progress=False).generate(PROMPTS, 2, seed=seed)
    tuner = DiffusionFineTuner(policy, DiffusionFinetuneConfig(learning_rate=5e-2, epochs=epochs, batch_size=2),
                               None, progress=False)
    metrics = tuner.finetune(samples, seed=seed)
    assert np.isfinite(metrics["train/loss"]) and metrics["train/steps"] == 2 * epochs
    return tuner


def test_sd_pipeline_loads_by_path_with_lora_on_attention_projections(tiny_sd_dir):
    policy = policy_of(tiny_sd_dir)
    assert type(policy.pipeline).__name__ == "StableDiffusionPipeline"
    assert type(policy.pipeline.scheduler).__name__ == "DDIMScheduler"
    assert policy.default_resolution() == TINY_SIZE
    trainable = [n for n, p in policy.unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == {"to_q", "to_k", "to_v", "0"}
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    assert not any(p.requires_grad for p in policy.pipeline.vae.parameters())
    assert not any(p.requires_grad for p in policy.pipeline.text_encoder.parameters())
    euler = policy_of(tiny_sd_dir, scheduler="euler_ancestral")
    assert type(euler.pipeline.scheduler).__name__ == "EulerAncestralDiscreteScheduler"


def test_bad_models_fail_with_one_line(tiny_sd_dir, tmp_path):
    with pytest.raises(RaftError, match="model.name_or_path: no such folder"):
        policy_of(tmp_path / "absent")
    with pytest.raises(RaftError, match="model.name_or_path: cannot load"):
        policy_of(tmp_path)  # a folder, but no model_index.json
    with pytest.raises(RaftError, match="finetune.lora.target_modules"):
        load_policy(DiffusionModelConfig(name_or_path=str(tiny_sd_dir), device="cpu"),
                    DiffusionLoraConfig(target_modules=["no_such_module"]), None)


def test_each_image_depends_on_its_seed_not_its_batch(tiny_sd_dir):
    policy = policy_of(tiny_sd_dir)
    samples = DiffusionSampler(policy, GENERATION, progress=False).generate(PROMPTS, 3, seed=7)
    assert [s.prompt_index for s in samples] == [0, 0, 0, 1, 1, 1]
    seeds = [s.meta["seed"] for s in samples]
    assert len(set(seeds)) == 6
    assert samples[0].output.size == (TINY_SIZE, TINY_SIZE)
    again = DiffusionSampler(policy, GENERATION, progress=False).generate(PROMPTS, 3, seed=7)
    assert (arrays([s.output for s in again]) == arrays([s.output for s in samples])).all()
    # one image alone, from its recorded seed and settings, in a batch of one instead of four
    alone = regenerate(policy, samples[4].meta["settings"], [samples[4].prompt], [samples[4].meta["seed"]])
    assert np.abs(arrays(alone)[0] - arrays([samples[4].output])[0]).max() <= 1
    assert not (arrays([samples[3].output]) == arrays([samples[4].output])).all()


def test_lora_checkpoint_loads_into_a_fresh_pipeline_and_reproduces_the_images(tiny_sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    policy = policy_of(tiny_sd_dir)
    base_images = DiffusionSampler(policy, GENERATION, progress=False).generate(PROMPTS, 2, seed=11)
    tuner = trained(policy)
    aligned = DiffusionSampler(policy, GENERATION, progress=False).generate(PROMPTS, 2, seed=11)
    assert np.abs(arrays([s.output for s in aligned]) - arrays([s.output for s in base_images])).max() > 8

    tuner.save_checkpoint(tmp_path)
    assert (tmp_path / LORA_WEIGHTS).is_file()
    fresh = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(str(tmp_path))
    for sample in aligned:
        image = fresh(sample.prompt, height=TINY_SIZE, width=TINY_SIZE, num_inference_steps=3, guidance_scale=3.0,
                      generator=torch.Generator().manual_seed(sample.meta["seed"])).images[0]
        assert np.abs(arrays([image])[0] - arrays([sample.output])[0]).max() <= 1


@pytest.mark.parametrize("alpha", [4, 16])
def test_lora_scale_survives_the_round_trip(tiny_sd_dir, tmp_path, alpha):
    """alpha != r changes the adapter's scale; the saved metadata must restore it on load."""
    config = DiffusionModelConfig(name_or_path=str(tiny_sd_dir), device="cpu")
    policy = load_policy(config, DiffusionLoraConfig(r=4, alpha=alpha), None, seed=1)
    trained(policy, epochs=1)
    expected = DiffusionSampler(policy, GENERATION, progress=False).generate(PROMPTS[:1], 2, seed=3)
    save_policy(policy, tmp_path)
    resumed = load_policy(config, DiffusionLoraConfig(r=4, alpha=alpha), tmp_path)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in resumed.trainable_parameters())
    assert len(resumed.trainable_parameters()) == len(policy.trainable_parameters())
    got = DiffusionSampler(resumed, GENERATION, progress=False).generate(PROMPTS[:1], 2, seed=3)
    assert (arrays([s.output for s in got]) == arrays([s.output for s in expected])).all()


def test_lora_initialisation_follows_the_seed(tiny_sd_dir):
    a, b, c = (policy_of(tiny_sd_dir, seed=s) for s in (5, 5, 6))
    first = lambda p: p.trainable_parameters()[0].detach()  # noqa: E731 (a lora_A matrix: gaussian init)
    assert torch.equal(first(a), first(b)) and not torch.equal(first(a), first(c))


def test_full_unet_fine_tuning_saves_and_resumes(tiny_sd_dir, tmp_path):
    policy = policy_of(tiny_sd_dir, lora=False)
    assert len(policy.trainable_parameters()) == len(list(policy.unet.parameters()))
    tuner = trained(policy, epochs=1)
    expected = DiffusionSampler(policy, GENERATION, progress=False).generate(PROMPTS[:1], 2, seed=3)
    tuner.save_checkpoint(tmp_path)
    assert (tmp_path / "unet" / "config.json").is_file() and not (tmp_path / LORA_WEIGHTS).exists()
    resumed = policy_of(tiny_sd_dir, lora=False, checkpoint=tmp_path)
    got = DiffusionSampler(resumed, GENERATION, progress=False).generate(PROMPTS[:1], 2, seed=3)
    assert (arrays([s.output for s in got]) == arrays([s.output for s in expected])).all()
    with pytest.raises(RaftError, match="holds no LoRA adapter"):
        policy_of(tiny_sd_dir, lora=True, checkpoint=tmp_path)


def test_fine_tuning_lowers_the_denoising_loss_on_the_kept_images(tiny_sd_dir):
    policy = policy_of(tiny_sd_dir)
    samples = DiffusionSampler(policy, GENERATION, progress=False).generate(PROMPTS, 2, seed=0)
    tuner = DiffusionFineTuner(policy, DiffusionFinetuneConfig(learning_rate=2e-2, epochs=1, batch_size=4), None,
                               progress=False)
    moments, texts = tuner.encode(samples)

    def held_loss():
        with torch.no_grad():
            return np.mean([tuner.loss(moments, texts, torch.Generator().manual_seed(s)).item() for s in range(8)])

    before = held_loss()
    for seed in range(15):
        tuner.finetune(samples, seed=seed)
    assert held_loss() < 0.9 * before


def test_carried_optimizer_state_is_checkpointed(tiny_sd_dir, tmp_path):
    policy = policy_of(tiny_sd_dir)
    samples = [Sample(0, PROMPTS[0], DiffusionSampler(policy, GENERATION, progress=False).generate(PROMPTS[:1], 1, 0)[0].output)]
    tuner = DiffusionFineTuner(policy, DiffusionFinetuneConfig(epochs=1, batch_size=1, carry_optimizer_state=True),
                               None, progress=False)
    tuner.finetune(samples, seed=0)
    tuner.save_checkpoint(tmp_path)
    assert (tmp_path / "optimizer.pt").is_file()
    resumed = policy_of(tiny_sd_dir, checkpoint=tmp_path)
    again = DiffusionFineTuner(resumed, DiffusionFinetuneConfig(epochs=1, batch_size=1, carry_optimizer_state=True),
                               tmp_path, progress=False)
    assert again.optimizer is not None and again.optimizer.state_dict()["state"]


@pytest.mark.parametrize("lora", [True, False])
def test_anchor_holds_the_predictions_near_the_start(tiny_sd_dir, lora):
    """finetune.anchor pulls the UNet's predictions toward the starting UNet's (LoRA: the adapter switched off;
    whole UNet: a frozen copy of the base): the same fine-tuning moves them less, and the drift is logged."""
    from raft.modalities.diffusion.model import load_start_unet

    model = DiffusionModelConfig(name_or_path=str(tiny_sd_dir), device="cpu")
    start = load_start_unet(model, torch.device("cpu"))
    probe = torch.Generator().manual_seed(99)
    noisy = torch.randn((4, 4, 8, 8), generator=probe)
    timesteps = torch.randint(0, 1000, (4,), generator=probe)

    def drift_after(anchor):
        policy = policy_of(tiny_sd_dir, lora=lora)
        samples = DiffusionSampler(policy, GENERATION, progress=False).generate(PROMPTS, 2, seed=0)
        config = DiffusionFinetuneConfig(learning_rate=5e-2 if lora else 2e-3, epochs=3, batch_size=2, anchor=anchor)
        tuner = DiffusionFineTuner(policy, config, None, progress=False, start_unet=None if lora else start)
        metrics = tuner.finetune(samples, seed=0)
        assert ("train/drift_from_start" in metrics) == (anchor > 0)
        assert all(p.requires_grad for p in policy.trainable_parameters()) and policy.trainable_parameters()
        with torch.no_grad():
            text = policy.encode_prompts(PROMPTS * 2)
            moved = policy.unet(noisy, timesteps, text).sample
            return torch.mean((moved - start(noisy, timesteps, text).sample) ** 2).item(), metrics

    free, _ = drift_after(0.0)
    held, metrics = drift_after(20.0)
    assert free > 0 and held < 0.5 * free
    assert 0 <= metrics["train/drift_from_start"] < free
    if not lora:
        with pytest.raises(ValueError, match="needs the starting UNet"):
            DiffusionFineTuner(policy_of(tiny_sd_dir, lora=False), DiffusionFinetuneConfig(anchor=1.0), None)
