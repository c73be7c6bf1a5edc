"""Config of the diffusion modality. The defaults are the offline default run: raft's own small Stable Diffusion
pipeline (trained on the shapes world, shipped in the package) learns to follow compositional prompts such
as "a red circle above a blue square", rewarded by raft's own small CLIP model, in minutes on 2 CPU cores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from raft.config import GeneratorConfig, RaftConfig, _check, check_generators, check_ranker_weights, option

SCHEDULERS = ("default", "ddim", "ddpm", "pndm", "euler", "euler_ancestral", "dpm_solver", "unipc", "lms")


@dataclass
class DiffusionModelConfig:
    name_or_path: str = option(
        "builtin:shapes",
        "Text-to-image pipeline to align: a Hugging Face hub id (stable-diffusion-v1-5/stable-diffusion-v1-5), a "
        "local diffusers folder, or builtin:shapes (raft's small offline model of the shapes world).",
    )
    revision: str | None = option(None, "Hub revision (branch, tag or commit) of name_or_path.")
    variant: str | None = option(None, "Weight variant to load, e.g. fp16 (files named *.fp16.safetensors).")
    dtype: Literal["float32", "float16", "bfloat16"] = option(
        "float32", "Dtype of the frozen weights (UNet, VAE, text encoder). Trained weights are always float32.")
    device: str = option("auto", "auto (cuda when available, else cpu), cpu, cuda or cuda:N.")
    scheduler: Literal[SCHEDULERS] = option(
        "ddim",
        "Sampling scheduler: default (the pipeline's own), ddim, ddpm, pndm, euler, euler_ancestral, dpm_solver "
        "(DPM-Solver++ multistep), unipc or lms; built from the pipeline's scheduler config.",
    )
    safety_checker: bool = option(
        False, "Keep the pipeline's safety checker. It blacks out flagged images, which the rankers would then score.")


@dataclass
class DiffusionDataConfig:
    prompts: str = option(
        "shapes",
        "Training prompts: shapes (every two-object caption of the shapes world, the offline default), cifar10 "
        "or cifar100 (class names, as in the RAFT paper), or a file: .txt (one per line), .jsonl/.json, .csv or "
        ".parquet (column `prompt_field`).",
    )
    prompt_field: str = option("prompt", "Column holding the prompt in .jsonl/.json/.csv/.parquet files.")
    prompt_template: str = option(
        "{prompt}",
        "Turns each prompt into the text the pipeline gets, e.g. 'a photo of a {prompt}'; used in sampling, "
        "training and by the CLIP ranker alike.",
    )
    eval_prompts: str | None = option(
        None,
        "Held-out prompts (same forms as `prompts`). null: `eval_size` prompts are split off `prompts` and never "
        "trained on (for shapes: whole scenes, so 'x above y' and 'y below x' stay on one side).",
    )
    eval_size: int = option(32, "Held-out prompts used for evaluation.")


@dataclass
class DiffusionGenerationConfig:
    resolution: int | None = option(
        None, "Image height and width in pixels (null: the model's own, UNet sample_size x VAE scale factor).")
    num_inference_steps: int = option(20, "Denoising steps per image.")
    guidance_scale: float = option(3.0, "Classifier-free guidance scale (1: no guidance).")
    eta: float = option(0.0, "DDIM eta (0: deterministic DDIM); ignored by other schedulers.")
    negative_prompt: str = option("", "Negative prompt for classifier-free guidance (empty: the unconditional prompt).")
    batch_size: int = option(32, "Images per pipeline call (prompts x samples are cut into batches of this size).")


@dataclass
class DiffusionGeneratorConfig(GeneratorConfig):
    kind: Literal["policy", "file"] = option(
        "policy",
        "policy: the pipeline being aligned samples (the default); file: pre-generated images listed in a file or "
        "dataset (another model's, an earlier run's samples.jsonl, hand-picked ones).",
    )
    sampling_negative_prompt: str | None = option(
        None, "Negative prompt used only when sampling training images (null: generation.negative_prompt).")
    sampling_guidance_scale: float | None = option(
        None,
        "Guidance scale used only when sampling training images (null: generation.guidance_scale). Fine-tuned on "
        "its own images, a model learns how the sampler draws as much as what the reward picked: drawn with the "
        "evaluation's guidance 3, the offline model's training images made it sharper, less diverse and its JPEG "
        "files larger whatever was kept; drawn with 1, the JPEG selection carried over (reports/diffusion-transfer).")
    image_field: str = option(
        "output",
        "kind file: column holding the image path (`output` is what raft's samples.jsonl calls it); relative paths "
        "are read from the file's folder.")
    allow_outside_paths: bool = option(
        False, "kind file: accept image paths outside the file's folder (absolute, or climbing out with ..); off, "
        "such a row stops the run in one line, so a table cannot make raft read any image on the machine.")


@dataclass
class DiffusionRankerConfig:
    kind: Literal["clip", "pickscore", "hpsv2", "imagereward", "laion-aesthetic-v2", "aesthetic", "compressibility",
                  "incompressibility", "callable"] = option(
        "clip",
        "clip: 100 x cosine of the CLIP embeddings of image and prompt (HF CLIP checkpoints or open_clip models); "
        "pickscore: PickScore v1, logit_scale x that cosine; hpsv2: HPS v2, the cosine on its fine-tuned CLIP "
        "ViT-H-14; imagereward: ImageReward v1.0 (BLIP + MLP, standardised); laion-aesthetic-v2: LAION's improved "
        "aesthetic predictor (sac+logos+ava1-l14-linearMSE over CLIP ViT-L/14, AVA 1-10 scale); aesthetic: that "
        "predictor with any head and CLIP; compressibility / incompressibility: minus / plus the JPEG size in kB at "
        "`jpeg_quality` (DDPO); callable: a Python function fn(prompts, images) -> list of floats.",
    )
    name: str | None = option(None, "Name in metrics and records (default: derived from the ranker).")
    weight: float = option(1.0, "Weight of this ranker when several are combined (reward = weighted sum).")
    model: str | None = option(
        None,
        "The model, a hub id or local path. clip/aesthetic/pickscore/laion-aesthetic-v2: a CLIP model (HF CLIPModel "
        "folder or id, builtin:shapes-clip, or open_clip:ARCH/PRETRAINED, which needs open-clip-torch); hpsv2: the "
        "open_clip checkpoint file (org/repo/file on the hub) or a folder already in HF CLIP layout; imagereward: a "
        "hub repo or folder holding ImageReward.pt and med_config.json (or the .pt file, the json beside it). null: "
        "builtin:shapes-clip (clip), openai/clip-vit-large-patch14 (aesthetic, laion-aesthetic-v2), "
        "yuvalkirstain/PickScore_v1, xswu/HPSv2/HPS_v2_compressed.pt (v2.1: xswu/HPSv2/HPS_v2.1_compressed.pt), "
        "THUDM/ImageReward.",
    )
    processor: str | None = option(
        None, "Hub id or folder of what `model` lacks: the tokenizer and image processor of CLIP kinds (and for "
        "hpsv2 the CLIP config its checkpoint is loaded into), the BERT tokenizer of imagereward. null: from "
        "`model`; pickscore and hpsv2: laion/CLIP-ViT-H-14-laion2B-s32B-b79K; imagereward: google-bert/bert-base-uncased.")
    prompt_template: str = option(
        "{prompt}", "kinds clip, pickscore, hpsv2: the text scored against each image; `{prompt}` is the prompt.")
    head: Literal["mlp", "linear"] = option(
        "mlp", "kind aesthetic: mlp (the improved predictor, 768-1024-128-64-16-1) or linear (v1, Linear(768, 1)).")
    weights: str | None = option(
        None,
        "kinds aesthetic, laion-aesthetic-v2: the head's weights, a local .pth/.pt/.bin/.safetensors file or a hub "
        "file as org/repo/file (loaded safely: safetensors or torch.load(weights_only=True)). null with head mlp: "
        "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth (the sac+logos+ava1-l14-linearMSE head as TRL's DDPO "
        "publishes it on the hub; LAION's own copy is on GitHub).",
    )
    jpeg_quality: int = option(95, "kind compressibility/incompressibility: JPEG quality of the size measurement.")
    function: str | None = option(None, "kind callable: module:function or path/to/file.py:function.")
    batch_size: int = option(32, "Model kinds (all but compressibility and callable): images per forward pass.")


@dataclass
class DiffusionLoraConfig:
    enabled: bool = option(True, "Train a LoRA adapter on the UNet (peft). Off: fine-tune the whole UNet.")
    r: int = option(4, "LoRA rank (TRL's DDPO/AlignProp: 4).")
    alpha: int = option(4, "LoRA alpha (scale = alpha / r).")
    dropout: float = option(0.0, "LoRA dropout.")
    target_modules: list[str] = option(
        ["to_q", "to_k", "to_v", "to_out.0"], "UNet modules to adapt: the attention projections by default.")
    init: Literal["gaussian", "default"] = option(
        "gaussian", "Initialisation of the LoRA A matrices (B starts at zero, so the adapter starts as a no-op).")


@dataclass
class DiffusionFinetuneConfig:
    learning_rate: float = option(
        3e-4, "AdamW learning rate, constant. On the offline default 3e-3 lowered the held-out reward every iteration; "
        "SD 1.5 LoRA: around 1e-4 to 3e-4.")
    epochs: int = option(4, "Passes over the kept set per iteration.")
    batch_size: int = option(8, "Images per optimizer step (split into micro-batches by gradient_accumulation_steps).")
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0: off).")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    caption_dropout: float = option(
        0.0,
        "Share of the kept images trained with the empty prompt, so the unconditional prediction that "
        "classifier-free guidance subtracts moves along with the conditional one.")
    timestep_range: list[float] = option(
        [0.0, 1.0],
        "Training timesteps are drawn uniformly from this share of the noise schedule ([0, 1]: all, the standard "
        "loss). Layout is decided at the noisy end: [0.5, 1.0] trains only there, leaving the fine detail of the "
        "low-noise steps alone (on the offline default it did not change the outcome; see the README).")
    carry_optimizer_state: bool = option(
        False, "Keep AdamW moments across iterations (and in checkpoints). Off: a fresh optimizer each iteration.")
    gradient_checkpointing: bool = option(False, "Trade compute for memory in the UNet during fine-tuning.")
    mixed_precision: Literal["no", "bf16", "fp16"] = option(
        "no", "Mixed precision of fine-tuning (accelerate's autocast; the weights stay in model.dtype): bf16 (GPUs that "
        "have it, and CPUs), fp16 (CUDA, with loss scaling) or no.")
    lora: DiffusionLoraConfig = option(DiffusionLoraConfig(), "LoRA adapter settings.")


@dataclass
class DiffusionEvalConfig:
    samples_per_prompt: int = option(
        16, "Policy images per held-out prompt for the held-out reward. The offline default's images vary a lot "
        "from seed to seed: with 4, the held-out mean moved by 1.9 (std) between evaluation seeds alone.")
    seed: int = option(1234, "Seed of the held-out images, the same every iteration: each (prompt, sample) keeps its noise.")
    embedding_model: str | None = option(
        None,
        "CLIP model whose image embeddings measure diversity (same forms as rankers' model), or pixels. null: the "
        "model of the first clip/aesthetic ranker, else pixels.",
    )
    grid_prompts: int = option(8, "Held-out prompts shown in each iteration's eval_grid.png (one row each; 0: no grid).")


@dataclass
class DiffusionRaftConfig(RaftConfig):
    modality: str = option("diffusion", "Which modality runs: text or diffusion (or a registered plug-in).")
    iterations: int = option(8, "RAFT iterations (generate -> rank -> select -> fine-tune -> evaluate).")
    prompts_per_iteration: int = option(16, "Prompts drawn per iteration (b in the paper).")
    samples_per_prompt: int = option(8, "Images generated per prompt (K in the paper).")
    model: DiffusionModelConfig = option(DiffusionModelConfig(), "The text-to-image pipeline.")
    data: DiffusionDataConfig = option(DiffusionDataConfig(), "Prompts and held-out prompts.")
    generation: DiffusionGenerationConfig = option(DiffusionGenerationConfig(), "Sampling settings.")
    generators: list[DiffusionGeneratorConfig] = option(
        [DiffusionGeneratorConfig()],
        "Where the training images come from: the policy (default, optionally with a magic prompt), files of "
        "pre-generated images, or a mixture of them by share. The held-out evaluation always samples the policy "
        "with the plain prompt.",
    )
    rankers: list[DiffusionRankerConfig] = option([DiffusionRankerConfig()], "Rewards; several are combined as a weighted sum.")
    finetune: DiffusionFinetuneConfig = option(DiffusionFinetuneConfig(), "Fine-tuning on the kept images (denoising loss).")
    eval: DiffusionEvalConfig = option(DiffusionEvalConfig(), "Held-out evaluation.")

    # no exact image likelihoods here: no KL-regularized ranking, no KL metric
    diversity_features: ClassVar[tuple[str, ...]] = ("clip", "pixels")
    guard_metrics: ClassVar[tuple[str, ...]] = ("eval/diversity_within_prompt",)

    def validate(self) -> None:
        super().validate()
        g = self.generation
        _check(g.resolution is None or (g.resolution >= 8 and g.resolution % 8 == 0), "generation.resolution",
               "must be a multiple of 8 (or null)")
        _check(g.num_inference_steps >= 1, "generation.num_inference_steps", "must be >= 1")
        _check(g.guidance_scale >= 0, "generation.guidance_scale", "must be >= 0")
        _check(0 <= g.eta <= 1, "generation.eta", "must be in [0, 1]")
        _check(g.batch_size >= 1, "generation.batch_size", "must be >= 1")
        self._validate_generators()
        _check(bool(self.rankers), "rankers", "must list at least one ranker")
        check_ranker_weights(self.rankers)
        for i, ranker in enumerate(self.rankers):
            _check(ranker.kind != "callable" or bool(ranker.function), f"rankers.{i}.function", "is required by kind callable")
            _check(ranker.kind != "aesthetic" or ranker.head != "linear" or bool(ranker.weights), f"rankers.{i}.weights",
                   "is required by the linear aesthetic head (e.g. sa_0_4_vit_l_14_linear.pth)")
            _check("{prompt}" in ranker.prompt_template, f"rankers.{i}.prompt_template", "must contain {prompt}")
            _check(1 <= ranker.jpeg_quality <= 100, f"rankers.{i}.jpeg_quality", "must be in [1, 100]")
            _check(ranker.batch_size >= 1, f"rankers.{i}.batch_size", "must be >= 1")
        f = self.finetune
        _check(f.learning_rate > 0, "finetune.learning_rate", "must be > 0")
        _check(f.epochs >= 1, "finetune.epochs", "must be >= 1")
        _check(0 <= f.caption_dropout < 1, "finetune.caption_dropout", "must be in [0, 1)")
        r = f.timestep_range
        _check(len(r) == 2 and 0 <= r[0] < r[1] <= 1, "finetune.timestep_range", "must be [low, high] with 0 <= low < high <= 1")
        _check(f.batch_size >= 1, "finetune.batch_size", "must be >= 1")
        _check(f.gradient_accumulation_steps >= 1 and f.batch_size % f.gradient_accumulation_steps == 0,
               "finetune.gradient_accumulation_steps", "must be >= 1 and divide finetune.batch_size")
        _check(f.lora.r >= 1, "finetune.lora.r", "must be >= 1")
        _check(f.lora.alpha >= 1, "finetune.lora.alpha", "must be >= 1")
        _check(f.max_grad_norm >= 0, "finetune.max_grad_norm", "must be >= 0 (0: no clipping)")
        _check(f.weight_decay >= 0, "finetune.weight_decay", "must be >= 0")
        _check(self.eval.seed >= 0, "eval.seed", "must be >= 0")
        _check(bool(f.lora.target_modules), "finetune.lora.target_modules", "must name at least one module")
        _check("{prompt}" in self.data.prompt_template, "data.prompt_template", "must contain {prompt}")
        _check(self.data.eval_size >= 1, "data.eval_size", "must be >= 1")
        _check(self.eval.samples_per_prompt >= 1, "eval.samples_per_prompt", "must be >= 1")
        _check(self.eval.grid_prompts >= 0, "eval.grid_prompts", "must be >= 0")

    def _validate_generators(self) -> None:
        check_generators(self.generators, self.samples_per_prompt,
                         sampling_only=("sampling_negative_prompt", "sampling_guidance_scale"))
        for i, g in enumerate(self.generators):
            _check(g.sampling_guidance_scale is None or g.sampling_guidance_scale >= 0,
                   f"generators.{i}.sampling_guidance_scale", "must be >= 0 (or null)")
