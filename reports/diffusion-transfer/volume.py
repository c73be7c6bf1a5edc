"""Report section 8: does the shipped base learn two-object scenes at pre-training volume, and from which images?

Continues training the base the way it was pre-trained (batch 64, 10% empty captions, AdamW with a 100-step warmup,
UNet and text encoder, EMA weights; --unet-only and --ema-decay 0 make it raft's whole-UNet fine-tuning at batch 64)
on one of these image sets, and evaluates held-out (the 32 held-out captions x 8 images, eval seed 4321, as
probe.py), by the CLIP judge and by world.check, at the steps of --eval-at; one JSON line per evaluation to --out:

- true:      --pool true images of the training captions (with replacement; --pair-share < 1 mixes in single objects)
- own-clip / own-rule: the base's own images, 8 for each of the 1,160 training captions (seed 777, cached in
             --own-cache), the best --keep of each by the CLIP judge / by world.composition_reward
- own-exact: every own image that world.check passes as exact
- own-all:   all of them, unselected

    python reports/diffusion-transfer/volume.py --tag true --lr 3e-4 --unet-only --ema-decay 0 --steps 1500
    python reports/diffusion-transfer/volume.py --tag own-exact --source own-exact --lr 3e-4 --unet-only --ema-decay 0

An experiment script, kept to reproduce the report; none of it is a raft option."""
import sys, copy, time, json, argparse, numpy as np, torch, torch.nn.functional as F
REPO = __import__("pathlib").Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO)); sys.path.insert(0, str(REPO / "scripts"))
import raft
from raft.modalities import get_modality
from raft.modalities.diffusion import world, data as ddata
from raft.rankers import score_samples
from train_offline_diffusion import encode_pool, tokenize, noise_schedulers
ap = argparse.ArgumentParser()
ap.add_argument("--pair-share", type=float, default=1.0, help="true: share of training pair captions (the rest: single objects)")
ap.add_argument("--lr", type=float, default=1e-4)
ap.add_argument("--steps", type=int, default=1500)
ap.add_argument("--eval-at", default="0,250,500,1000,1500")
ap.add_argument("--pool", type=int, default=20000)
ap.add_argument("--unet-only", action="store_true")
ap.add_argument("--tag", default="")
ap.add_argument("--out", default="volume-results.jsonl")
ap.add_argument("--source", default="true", choices=["true", "own-clip", "own-rule", "own-all", "own-exact"])
ap.add_argument("--keep", type=int, default=1)
ap.add_argument("--ema-decay", type=float, default=0.999)
ap.add_argument("--batch", type=int, default=64)
ap.add_argument("--own-cache", default="/tmp/raft-volume-own-pool.pkl")
a = ap.parse_args()
t0 = time.time()
torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "2")))
config = raft.load_config("diffusion", None, ["finetune.lora.enabled=false"])
parts = get_modality("diffusion").build(config, checkpoint=None)
pipe = parts.finetuner.policy.pipeline
train_prompts = ddata.load_prompts(config.data).prompts
held = parts.eval_prompts
rng = np.random.default_rng(11)
singles = [s.caption for s in world.single_scenes()]
if a.source == "true":
    caps = [train_prompts[rng.integers(len(train_prompts))] if rng.random() < a.pair_share else singles[rng.integers(len(singles))]
            for _ in range(a.pool)]
    images = world.images_to_array([world.draw(world.parse(c), rng) for c in caps])
else:
    import pickle, os
    if os.path.exists(a.own_cache):
        pool = pickle.load(open(a.own_cache, "rb"))
    else:
        samples = parts.policy.generate(train_prompts, 8, seed=777)
        score_samples(parts.ranker, samples)
        rule = world.composition_reward([s.prompt for s in samples], [s.output for s in samples])
        pool = [(s.prompt_index, s.prompt, s.output, s.reward, r) for s, r in zip(samples, rule)]
        pickle.dump(pool, open(a.own_cache, "wb"))
        print("pool", len(pool), round(time.time() - t0), flush=True)
    groups = {}
    for i, q, im, c, r in pool:
        # own-rule ranks by the rule reward, ties broken by the CLIP score
        groups.setdefault(i, []).append((c if a.source == "own-clip" else r + 1e-3 * c, q, im, c, r))
    kept = [x for g in groups.values() for x in (g if a.source == "own-all" else [x for x in g if x[4] >= 1.0] if a.source == "own-exact" else sorted(g, key=lambda x: -x[0])[: a.keep])]
    caps = [x[1] for x in kept]
    images = world.images_to_array([x[2] for x in kept])
    chk = [world.check(x[2], x[1]) for x in kept]
    print(json.dumps(dict(tag=a.tag, kept=len(kept), prompts=len({x[1] for x in kept}), kept_clip=round(float(np.mean([x[3] for x in kept])), 2),
          kept_rule=round(float(np.mean([x[4] for x in kept])), 3), kept_exact=round(100 * float(np.mean([c.exact for c in chk])), 1))), flush=True)
mean, std = encode_pool(pipe.vae, images)
vocab = sorted(set(caps) | {""}); idx = {c: i for i, c in enumerate(vocab)}
tokens = tokenize(pipe.tokenizer, vocab); labels = torch.tensor([idx[c] for c in caps]); empty = idx[""]
models = torch.nn.ModuleDict({"unet": copy.deepcopy(pipe.unet), "text_encoder": copy.deepcopy(pipe.text_encoder)}).float()
ema = torch.nn.ModuleDict({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
models.train().requires_grad_(True)
if a.unet_only: models["text_encoder"].requires_grad_(False)
params = [p for p in models.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
alphas = noise_schedulers()[0].alphas_cumprod
g = torch.Generator().manual_seed(0)
def evaluate(step):
    ema.eval()
    samples = parts.policy.generate(held, 8, seed=4321)  # the pipeline samples with the EMA weights
    score_samples(parts.ranker, samples)
    r = np.array([s.reward for s in samples])
    chk = [world.check(s.output, s.prompt) for s in samples]
    out = dict(tag=a.tag, step=step, clip=round(float(r.mean()), 2), exact=round(100*float(np.mean([c.exact for c in chk])), 1),
               objects=round(100*float(np.mean([c.objects for c in chk])), 1), seconds=round(time.time()-t0))
    print(json.dumps(out), flush=True)
    with open(a.out, "a") as f: f.write(json.dumps(out) + "\n")
evals = [int(x) for x in a.eval_at.split(",")]
if 0 in evals: evaluate(0)
for step in range(a.steps):
    i = torch.randint(len(caps), (a.batch,), generator=g)
    lat = (mean[i] + std[i] * torch.randn(mean[i].shape, generator=g)) * pipe.vae.config.scaling_factor
    cond = labels[i].clone(); cond[torch.rand(a.batch, generator=g) < 0.1] = empty
    noise = torch.randn(lat.shape, generator=g); t = torch.randint(0, len(alphas), (a.batch,), generator=g)
    al = alphas[t].view(-1, 1, 1, 1)
    pred = models["unet"](al.sqrt() * lat + (1 - al).sqrt() * noise, t, models["text_encoder"](tokens[cond])[0]).sample
    loss = F.mse_loss(pred, noise); loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for e, p in zip(ema.parameters(), models.parameters()): e.lerp_(p, 1 - a.ema_decay)
    if step + 1 in evals: evaluate(step + 1)
