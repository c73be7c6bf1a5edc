"""The probe behind report.md: does one fine-tuning round on a kept set raise the held-out CLIP score?

A pool of 128 training prompts x 8 images from the starting policy (the prompts the default's seed-0 run draws in
its 8 iterations, sampled once with seed 777 and cached in --cache) is ranked; the kept set (best --keep of each
prompt, or every image >= --min-reward; or true images of the world: --oracle N per kept prompt, --oracle-all N per
training prompt) fine-tunes a fresh policy once with the default recipe plus any `key=value` overrides; then the
held-out prompts are drawn (32 x --eval-images, eval seed 4321, which no run reports) and scored. Figures are
paired with the starting policy's at the same seeds (--base). One JSON line per call is appended to --out.

    python reports/diffusion-transfer/probe.py --base --tag default
    python reports/diffusion-transfer/probe.py --tag lr1e-3 finetune.learning_rate=1e-3 finetune.epochs=16
    python reports/diffusion-transfer/probe.py --tag oracle --oracle 8 finetune.learning_rate=1e-3
    python reports/diffusion-transfer/probe.py --jpeg --base --tag jpeg rankers.0.kind=compressibility

An experiment script, kept to reproduce the report (--train-text patches the fine-tuner to train the whole text
encoder too, --x0-weight reweights its loss by min(1/SNR, w), --ema evaluates an EMA of the fine-tuned weights, --guided-loss fits the guided prediction;
none is a raft option). A retrained base is probed with model.name_or_path=FOLDER and its own --cache.
"""
import argparse, json, pickle, sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import raft
from raft.loop import draw_prompts, evaluate
from raft.modalities import get_modality
from raft.rankers import score_samples

p = argparse.ArgumentParser()
p.add_argument("--cache", default="/tmp/raft-probe-pool.pkl")
p.add_argument("--out", default="probe-results.jsonl")
p.add_argument("--prompts", type=int, default=128)
p.add_argument("--k", type=int, default=8)
p.add_argument("--keep", type=int, default=1)
p.add_argument("--eval-images", type=int, default=8)
p.add_argument("--eval-seed", type=int, default=4321)
p.add_argument("--base", action="store_true")
p.add_argument("--tag", default="")
p.add_argument("--train-eval", action="store_true")
p.add_argument("--train-text", action="store_true")
p.add_argument("--pool-guidance", type=float, default=None, help="guidance of the pool (default: the config's, 3); use another --cache")
p.add_argument("--jpeg", action="store_true")
p.add_argument("--oracle-all", type=int, default=0)
p.add_argument("--oracle", type=int, default=0)
p.add_argument("--min-reward", type=float, default=None)
p.add_argument("--pool-prompts", type=int, default=128)
p.add_argument("--x0-weight", type=float, default=0.0,
               help="weight each image's noise-prediction error by min(1/SNR(t), this) (an x0-space loss, clipped), "
                    "so the high-noise steps that set layout and colour weigh as much as the fine detail")
p.add_argument("--ema", type=float, default=0.0,
               help="keep an exponential moving average of the trained weights (this decay) and evaluate it, as the "
                    "base's pre-training does")
p.add_argument("--guided-loss", type=float, default=0.0,
               help="fit the classifier-free-guided prediction uncond + w (cond - uncond) to the kept images with this w "
                    "(DDPO's policy is the guided sampler's), gradients through both branches")
p.add_argument("--guided-detach", action="store_true",
               help="with --guided-loss: no gradient through the unconditional branch, so only the conditional "
                    "prediction moves, toward the target that makes the guided prediction fit the kept images")
p.add_argument("overrides", nargs="*")
a = p.parse_args()
t0 = time.time()
config = raft.load_config("diffusion", None, a.overrides)
config.eval.samples_per_prompt = a.eval_images
cache = Path(a.cache)
if cache.exists():
    pool = pickle.load(open(cache, "rb"))
else:
    pool_overrides = [] if a.pool_guidance is None else [f"generation.guidance_scale={a.pool_guidance}"]
    model = [o for o in a.overrides if o.startswith("model.")]  # the pool comes from the model probed
    parts = get_modality("diffusion").build(raft.load_config("diffusion", None, model + pool_overrides), checkpoint=None)
    prompts = [q for it in range(1, a.pool_prompts // 16 + 1) for q in draw_prompts(parts.prompts, 16, 0, it)]
    samples = parts.policy.generate(prompts, 8, seed=777)
    score_samples(parts.ranker, samples)
    pool = [(s.prompt_index, s.prompt, s.output, s.reward) for s in samples]
    pickle.dump(pool, open(cache, "wb"))
    print("pool built", time.time() - t0, flush=True)
from raft.interface import Sample
if a.jpeg:
    from raft.modalities.diffusion.rankers import jpeg_kilobytes
    pool = [(i, q, im, -jpeg_kilobytes(im)) for i, q, im, _ in pool]
groups = {}
for i, prompt, img, r in pool:
    if i < a.prompts:
        groups.setdefault(i, []).append((r, prompt, img))
kept = []
for i, g in groups.items():
    g = sorted(g, key=lambda x: -x[0])
    g = [x for x in g if x[0] >= a.min_reward] if a.min_reward is not None else g[: a.keep]
    kept += [Sample(prompt_index=i, prompt=pr, output=im, reward=r) for r, pr, im in g]
if a.oracle:
    import numpy as np
    from raft.modalities.diffusion import world
    rng = np.random.default_rng(3)
    kept = [Sample(prompt_index=s.prompt_index, prompt=s.prompt, output=world.draw(world.parse(s.prompt), rng), reward=91.5)
            for s in kept for _ in range(a.oracle)]
if a.oracle_all:
    import numpy as np
    from raft.modalities.diffusion import world, data as ddata
    rng = np.random.default_rng(4)
    train_prompts = ddata.load_prompts(config.data).prompts
    kept = [Sample(prompt_index=0, prompt=q, output=world.draw(world.parse(q), rng), reward=91.5)
            for q in train_prompts for _ in range(a.oracle_all)]
parts = get_modality("diffusion").build(config, checkpoint=None)
parts.eval_seed = a.eval_seed
if a.train_text:
    from raft.modalities.diffusion.finetune import DiffusionFineTuner
    policy = parts.finetuner.policy
    te = policy.pipeline.text_encoder
    te.float().requires_grad_(True)
    unet_params = policy.trainable_parameters()
    policy.trainable_parameters = lambda: unet_params + list(te.parameters())
    class TE(DiffusionFineTuner):
        def encode(self, selected):
            moments, _ = super().encode(selected)
            tk = self.policy.pipeline.tokenizer
            tok = tk([s.prompt for s in selected], padding="max_length", max_length=tk.model_max_length, truncation=True, return_tensors="pt").input_ids
            return moments, tok
        def loss_terms(self, moments, tok, generator, empty=None):
            te = self.policy.pipeline.text_encoder
            text = te(tok.to(self.policy.device))[0]
            if empty is not None:  # the unconditional embedding moves with the text encoder
                tk = self.policy.pipeline.tokenizer
                empty = te(tk([""], padding="max_length", max_length=tk.model_max_length, return_tensors="pt").input_ids)[0]
            return super().loss_terms(moments, text, generator, empty)
    parts.finetuner = TE(policy, config.finetune, None)
if a.x0_weight:
    import torch.nn.functional as F
    from raft.modalities.diffusion.finetune import DiffusionFineTuner
    class X0(type(parts.finetuner)):
        def loss_terms(self, moments, text, generator, empty=None):
            policy, scheduler = self.policy, self.noise_scheduler
            vae_config = policy.pipeline.vae.config
            mean, logvar = moments.chunk(2, dim=1)
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            draws = generator if isinstance(generator, dict) else self.draw(generator, len(mean), mean.shape[1:], False)
            latents = (mean + std * draws["latent"]) * vae_config.scaling_factor
            noise, t = draws["noise"], draws["timesteps"]
            noisy = scheduler.add_noise(latents, noise, t)
            abar = scheduler.alphas_cumprod[t]
            w = ((1 - abar) / abar).clamp(max=a.x0_weight)
            prediction = self.trainer.model(noisy, t, text).sample
            per = F.mse_loss(prediction.float(), noise, reduction="none").mean(dim=(1, 2, 3))
            loss = (w * per).sum() / w.sum()
            return {"loss": loss, "denoise": loss}
    parts.finetuner = X0(parts.finetuner.policy, config.finetune, None)
if a.guided_loss:
    import torch.nn.functional as F
    class Guided(type(parts.finetuner)):
        def loss_terms(self, moments, text, generator, empty=None):
            policy, scheduler = self.policy, self.noise_scheduler
            unconditional_text = policy.encode_prompts([""]).expand_as(text)
            mean, logvar = moments.chunk(2, dim=1)
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            draws = generator if isinstance(generator, dict) else self.draw(generator, len(mean), mean.shape[1:], False)
            latents = (mean + std * draws["latent"]) * policy.pipeline.vae.config.scaling_factor
            noise, t = draws["noise"], draws["timesteps"]
            noisy = scheduler.add_noise(latents, noise, t)
            both = self.trainer.model(torch.cat([noisy, noisy]), torch.cat([t, t]),
                                      torch.cat([unconditional_text, text])).sample.float()
            unconditional, conditional = both.chunk(2)
            if a.guided_detach:
                unconditional = unconditional.detach()
            loss = F.mse_loss(unconditional + a.guided_loss * (conditional - unconditional), noise)
            return {"loss": loss, "denoise": loss}
    parts.finetuner = Guided(parts.finetuner.policy, config.finetune, None)
res = {"tag": a.tag, "overrides": a.overrides, "kept": len(kept), "kept_mean": sum(s.reward for s in kept) / len(kept)}
if a.base:
    m, _ = evaluate(parts)
    res["base"] = m["eval/reward_mean"]; res["base_div"] = m.get("eval/diversity_within_prompt")
seen = sorted({s.prompt for s in kept if s.prompt_index < 32})
held = parts.eval_prompts
if a.base and a.train_eval:
    parts.eval_prompts = seen
    m, _ = evaluate(parts); res["train_prompts_base"] = m["eval/reward_mean"]
    parts.eval_prompts = held
if a.ema:
    trainer = parts.finetuner.trainer
    trained = [q for q in parts.finetuner.policy.trainable_parameters()]
    shadow = [q.detach().clone() for q in trained]
    plain_step = trainer.step
    def ema_step():
        plain_step()
        with torch.no_grad():
            for e, q in zip(shadow, trained):
                e.lerp_(q, 1 - a.ema)
    trainer.step = ema_step
t1 = time.time()
tm = parts.finetuner.finetune(kept, seed=5)
if a.ema:
    with torch.no_grad():
        for e, q in zip(shadow, trained):
            q.copy_(e)
res["ft_s"] = round(time.time() - t1, 1); res.update(tm)
m, _ = evaluate(parts)
res["after"] = m["eval/reward_mean"]; res["div_within"] = m.get("eval/diversity_within_prompt"); res["sem"] = m["eval/reward_sem"]
if a.train_eval:
    parts.eval_prompts = seen
    m, _ = evaluate(parts); res["train_prompts_after"] = m["eval/reward_mean"]
res["total_s"] = round(time.time() - t0, 1)
print(json.dumps(res), flush=True)
open(a.out, "a").write(json.dumps(res) + "\n")
