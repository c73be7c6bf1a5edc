"""Image demo: a prompt and a seed give the base pipeline's image and the aligned one's (the run's LoRA or UNet)
from the same noise, each scored by the run's rankers; below, the run's per-iteration grids and reward curve.

    raft demo image --run runs/diffusion-shapes
"""

from __future__ import annotations

import gradio as gr
import pandas as pd

from raft.demos.chat import SIDES, reward_line
from raft.demos.common import DemoRun, open_run, serve
from raft.errors import RaftError
from raft.interface import Sample
from raft.rankers import score_samples

CURVES = {"eval/reward_mean": "held-out", "reward/policy_mean": "policy samples", "reward/selected_mean": "kept samples"}


class ImageModels:
    def __init__(self, run: DemoRun):
        from raft.modalities.diffusion.config import DiffusionLoraConfig
        from raft.modalities.diffusion.model import load_policy
        from raft.modalities.diffusion.rankers import build_ranker

        config = run.config
        self.run = run
        # two pipelines rather than one with the adapter switched on and off: a full-UNet checkpoint works the same
        base = load_policy(config.model, DiffusionLoraConfig(enabled=False), None, seed=config.seed)
        aligned = load_policy(config.model, config.finetune.lora, run.checkpoint, seed=config.seed) if run.checkpoint else base
        self.policies = {"base": base, "aligned": aligned}
        self.ranker = build_ranker(config.rankers, base.device)

    def image(self, side: str, prompt: str, seed: int, steps: int):
        from raft.modalities.diffusion.sampler import regenerate, settings_of

        policy = self.policies[side]
        settings = settings_of(policy, self.run.config.generation) | {"num_inference_steps": steps}
        return regenerate(policy, settings, [self.prompt_text(prompt)], [seed])[0]

    def prompt_text(self, prompt: str) -> str:
        return self.run.config.data.prompt_template.replace("{prompt}", prompt)

    def rewards(self, prompt: str, images: dict) -> dict[str, Sample]:
        samples = {side: Sample(prompt_index=0, prompt=self.prompt_text(prompt), output=images[side]) for side in SIDES}
        score_samples(self.ranker, list(samples.values()))
        return samples


def enlarged(image, min_side: int = 256):
    """Small images (raft's offline models draw 32 pixels) enlarged without smoothing, as in eval_grid.png."""
    from PIL import Image

    scale = -(-min_side // max(image.size))  # ceil
    return image if scale <= 1 else image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def grids(run: DemoRun) -> list[tuple]:
    """Each iteration's eval_grid.png (the held-out prompts from the same seeds), captioned with its reward, as an
    image in memory: gradio serves its own copy, never a path into the run directory."""
    from PIL import Image

    if run.run_dir is None:
        return []
    rewards = {r["iteration"]: r.get("eval/reward_mean") for r in run.metrics()}
    shown = []
    for path in sorted((run.run_dir / "iterations").glob("iter-*/eval_grid.png")):
        iteration = int(path.parent.name.removeprefix("iter-"))
        reward = rewards.get(iteration)
        with Image.open(path) as grid:
            image = grid.convert("RGB")
        shown.append((image, f"iteration {iteration}" + (f" · held-out reward {reward:.3f}" if reward is not None else "")))
    return shown


def reward_curves(run: DemoRun) -> pd.DataFrame:
    rows = [{"iteration": r["iteration"], "reward": r[key], "series": label}
            for r in run.metrics() for key, label in CURVES.items() if isinstance(r.get(key), (int, float))]
    return pd.DataFrame(rows, columns=["iteration", "reward", "series"])


def build_app(models: ImageModels, max_prompt_chars: int, max_steps: int, steps: int | None = None) -> gr.Blocks:
    run = models.run
    default_steps = min(steps or run.config.generation.num_inference_steps, max_steps)
    with gr.Blocks(title="raft image: base vs aligned", analytics_enabled=False) as app:
        gr.Markdown("## raft image demo: base vs aligned\n" + run.summary())
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", elem_id="prompt", scale=3, placeholder="a red circle above a blue square",
                                info=f"at most {max_prompt_chars} characters")
            seed = gr.Number(label="Seed (same noise for both)", value=0, precision=0, minimum=0, elem_id="seed")
            steps = gr.Slider(1, max_steps, value=default_steps, step=1, label="Denoising steps", elem_id="steps")
        generate = gr.Button("Generate", variant="primary", elem_id="generate")
        status = gr.Markdown("", elem_id="status")
        outputs = {}
        with gr.Row():
            for side in SIDES:
                with gr.Column():
                    outputs[side] = gr.Image(label=f"{side.capitalize()} model", type="pil", height=320,
                                             elem_id=f"{side}-image", interactive=False)
                    outputs[f"{side}_reward"] = gr.Markdown("reward: —", elem_id=f"{side}-reward")
        shown = grids(run)
        if shown or run.metrics():
            gr.Markdown("### The run")
            gr.Gallery(shown, label="Held-out images per iteration (same prompts and seeds)", columns=2,
                       object_fit="contain", height=420, elem_id="grids", visible=bool(shown))
            gr.LinePlot(reward_curves(run), x="iteration", y="reward", color="series", label="Reward per iteration",
                        elem_id="reward-curve")
        views = [outputs["base"], outputs["aligned"], outputs["base_reward"], outputs["aligned_reward"]]

        def respond(text: str, seed_value, step_count):
            text = (text or "").strip()
            problem = None
            if not text:
                problem = "Enter a prompt."
            elif len(text) > max_prompt_chars:
                problem = f"⚠️ Prompt too long: {len(text)} characters, the limit is {max_prompt_chars}. Please shorten it."
            elif step_count is None or not 1 <= int(step_count) <= max_steps:
                problem = f"⚠️ Denoising steps must be between 1 and {max_steps}."
            elif seed_value is None or not 0 <= int(seed_value) < 2**63:
                problem = "⚠️ The seed must be a whole number ≥ 0."
            if problem:
                gr.Warning(problem)
                yield *[gr.skip()] * 4, problem
                return
            images = {}
            for side in SIDES:  # one after the other: the base image shows while the aligned one is drawn
                images[side] = models.image(side, text, int(seed_value), int(step_count))
                shown = [enlarged(images[s]) if s in images else gr.skip() for s in SIDES]
                yield *shown, gr.skip(), gr.skip(), "drawing the aligned image…" if side == "base" else "scoring…"
            try:
                scored = models.rewards(text, images)
            except RaftError as error:
                yield *[gr.skip()] * 4, f"⚠️ Reward unavailable: {error}"
                return
            lines = [reward_line([{f"{side}_reward": {"total": s.reward, "parts": dict(s.rewards)}}], side)
                     for side, s in scored.items()]
            yield gr.skip(), gr.skip(), *lines, ""

        inputs = [prompt, seed, steps]
        generate.click(respond, inputs, [*views, status])
        prompt.submit(respond, inputs, [*views, status])
    return app


def launch(run_path: str, base: str | None = None, host: str = "127.0.0.1", port: int | None = None,
           max_prompt_chars: int = 200, max_steps: int = 50, steps: int | None = None, block: bool = True,
           trust_run_code: bool = False, auth: tuple[str, str] | None = None, max_queue: int = 8):
    models = ImageModels(open_run(run_path, "diffusion", base, trust_run_code))
    # the run's grids are handed to gradio as images, so nothing of the run directory (config, weights, optimizer
    # state) is ever served: no allowed_paths
    return serve(build_app(models, max_prompt_chars, max_steps, steps), host, port, block, auth, max_queue)
