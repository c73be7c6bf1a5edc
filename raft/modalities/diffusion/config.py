"""Config of the diffusion modality. The defaults are the offline default run: raft's own small Stable Diffusion
pipeline (trained on the shapes world, shipped in the package) learns to follow compositional prompts such
as "a red circle above a blue square", rewarded by raft's own small CLIP model, in minutes on 2 CPU cores.

Each section extends the shared one of raft/config.py with the diffusion settings and defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from raft.config import (DataConfig, EvalConfig, FinetuneConfig, GenerationConfig, GeneratorConfig, LoraConfig,
                         ModelConfig, RaftConfig, RankerConfig, option, require, with_default)

SCHEDULERS = ("default", "ddim", "ddpm", "pndm", "euler", "euler_ancestral", "dpm_solver", "unipc", "lms")


@dataclass
class DiffusionModelConfig(ModelConfig):
    name_or_path: str = with_default(
        ModelConfig, "name_or_path", "builtin:shapes",
        "Text-to-image pipeline to align: a Hugging Face hub id (stable-diffusion-v1-5/stable-diffusion-v1-5), a "
        "local diffusers folder, or builtin:shapes (raft's small offline model of the shapes world).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = with_default(
        ModelConfig, "dtype", "float32",
        "Dtype of the frozen weights (UNet, VAE, text encoder). Trained weights are always float32.")
    variant: str | None = option(None, "Weight variant to load, e.g. fp16 (files named *.fp16.safetensors).")
    scheduler: Literal[SCHEDULERS] = option(
        "ddim",
        "Sampling scheduler: default (the pipeline's own), ddim, ddpm, pndm, euler, euler_ancestral, dpm_solver "
        "(DPM-Solver++ multistep), unipc or lms; built from the pipeline's scheduler config.",
    )
    safety_checker: bool = option(
        False, "Keep the pipeline's safety checker. It blacks out flagged images, which the rankers would then score.")


@dataclass
class DiffusionDataConfig(DataConfig):
    prompts: str = with_default(
        DataConfig, "prompts", "shapes",
        "Training prompts: shapes (every two-object caption of the shapes world, the offline default), cifar10 "
        "or cifar100 (class names, as in the RAFT paper), or a file: .txt (one per line), .jsonl/.json, .csv or "
        ".parquet (column `prompt_field`).",
    )
    prompt_template: str = with_default(
        DataConfig, "prompt_template", "{prompt}",
        "Turns each prompt into the text the pipeline gets, e.g. 'a photo of a {prompt}'; used in sampling, "
        "training and by the CLIP ranker alike.",
    )
    eval_prompts: str | None = with_default(
        DataConfig, "eval_prompts", None,
        "Held-out prompts (same forms as `prompts`). null: `eval_size` prompts are split off `prompts` and never "
        "trained on (for shapes: whole scenes, so 'x above y' and 'y below x' stay on one side).",
    )
    eval_size: int = with_default(DataConfig, "eval_size", 32)


@dataclass
class DiffusionGenerationConfig(GenerationConfig):
    resolution: int | None = option(
        None, "Image height and width in pixels, a multiple of 8 (null: the model's own, UNet sample_size x VAE scale "
        "factor).", min=8)
    num_inference_steps: int = option(20, "Denoising steps per image.", min=1)
    guidance_scale: float = option(3.0, "Classifier-free guidance scale (1: no guidance).", min=0)
    eta: float = option(0.0, "DDIM eta (0: deterministic DDIM); ignored by other schedulers.", min=0, max=1)
    negative_prompt: str = option("", "Negative prompt for classifier-free guidance (empty: the unconditional prompt).")
    batch_size: int = with_default(
        GenerationConfig, "batch_size", 32,
        "Images per pipeline call (prompts x samples are cut into batches of this size).")


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
        "files larger whatever was kept; drawn with 1, the JPEG selection carried over (reports/diffusion-transfer).",
        min=0)
    image_field: str = option(
        "output",
        "kind file: column holding the image path (`output` is what raft's samples.jsonl calls it); relative paths "
        "are read from the file's folder.")
    allow_outside_paths: bool = option(
        False, "kind file: accept image paths outside the file's folder (absolute, or climbing out with ..); off, "
        "such a row stops the run in one line, so a table cannot make raft read any image on the machine.")


@dataclass
class DiffusionRankerConfig(RankerConfig):
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
    jpeg_quality: int = option(95, "kind compressibility/incompressibility: JPEG quality of the size measurement.",
                               min=1, max=100)
    batch_size: int = with_default(RankerConfig, "batch_size", 32,
                                   "Model kinds (all but compressibility and callable): images per forward pass.")


@dataclass
class DiffusionLoraConfig(LoraConfig):
    enabled: bool = with_default(
        LoraConfig, "enabled", True, "Train a LoRA adapter on the UNet (peft). Off: fine-tune the whole UNet.")
    r: int = with_default(LoraConfig, "r", 4, "LoRA rank (TRL's DDPO/AlignProp: 4).")
    alpha: int = with_default(LoraConfig, "alpha", 4)
    target_modules: list[str] = with_default(
        LoraConfig, "target_modules", ["to_q", "to_k", "to_v", "to_out.0"],
        "UNet modules to adapt: the attention projections by default.")
    init: Literal["gaussian", "default"] = option(
        "gaussian", "Initialisation of the LoRA A matrices (B starts at zero, so the adapter starts as a no-op).")


@dataclass
class DiffusionFinetuneConfig(FinetuneConfig):
    learning_rate: float = with_default(
        FinetuneConfig, "learning_rate", 3e-4,
        "AdamW learning rate, constant. On the offline default 3e-3 lowered the held-out reward every iteration; "
        "SD 1.5 LoRA: around 1e-4 to 3e-4.")
    epochs: int = with_default(FinetuneConfig, "epochs", 4)
    batch_size: int = with_default(
        FinetuneConfig, "batch_size", 8,
        "Images per optimizer step (split into micro-batches by gradient_accumulation_steps).")
    gradient_checkpointing: bool = with_default(
        FinetuneConfig, "gradient_checkpointing", False, "Trade compute for memory in the UNet during fine-tuning.")
    caption_dropout: float = option(
        0.0,
        "Share of the kept images trained with the empty prompt, so the unconditional prediction that "
        "classifier-free guidance subtracts moves along with the conditional one.", min=0, below=1)
    timestep_range: list[float] = option(
        [0.0, 1.0],
        "Training timesteps are drawn uniformly from this share of the noise schedule ([0, 1]: all, the standard "
        "loss). Layout is decided at the noisy end: [0.5, 1.0] trains only there, leaving the fine detail of the "
        "low-noise steps alone (on the offline default it did not change the outcome; see the README).")
    anchor: float = option(
        0.0,
        "Weight of the pull toward the starting model: the loss adds anchor x the mean squared difference between "
        "the UNet's prediction and the starting UNet's on the same noisy latent, timestep and caption. That "
        "difference bounds the KL between the two samplers step by step (DPOK's KL regulariser), so it is the "
        "diffusion counterpart of the text modality's KL to the start: it holds the model near what it drew before "
        "while selection pulls it toward the kept images. With LoRA the start is the UNet with its adapter switched "
        "off; with the whole UNet, a frozen copy of the base UNet is loaded (one more UNet in memory). Its size each "
        "iteration is logged as train/drift_from_start. 0: off.", min=0)
    lora: DiffusionLoraConfig = option(DiffusionLoraConfig(), "LoRA adapter settings.")


@dataclass
class DiffusionEvalConfig(EvalConfig):
    samples_per_prompt: int = with_default(
        EvalConfig, "samples_per_prompt", 16,
        "Policy images per held-out prompt for the held-out reward. The offline default's images vary a lot "
        "from seed to seed: with 4, the held-out mean moved by 1.9 (std) between evaluation seeds alone.")
    seed: int = with_default(
        EvalConfig, "seed", 1234,
        "Seed of the held-out images, the same every iteration: each (prompt, sample) keeps its noise.")
    embedding_model: str | None = option(
        None,
        "CLIP model whose image embeddings measure diversity (same forms as rankers' model), or pixels. null: the "
        "model of the first clip/aesthetic ranker, else pixels.",
    )
    grid_prompts: int = option(
        8, "Held-out prompts shown in each iteration's eval_grid.png (one row each; 0: no grid).", min=0)


@dataclass
class DiffusionRaftConfig(RaftConfig):
    modality: str = with_default(RaftConfig, "modality", "diffusion")
    iterations: int = with_default(RaftConfig, "iterations", 8)
    samples_per_prompt: int = with_default(RaftConfig, "samples_per_prompt", 8, "Images generated per prompt (K in the paper).")
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
    sampling_only: ClassVar[tuple[str, ...]] = ("sampling_negative_prompt", "sampling_guidance_scale")

    def validate(self) -> None:
        super().validate()  # the declared ranges, then the rules every modality shares
        resolution = self.generation.resolution
        require(resolution is None or resolution % 8 == 0, "generation.resolution", "must be a multiple of 8 (or null)")
        for i, ranker in enumerate(self.rankers):
            require(ranker.kind != "aesthetic" or ranker.head != "linear" or bool(ranker.weights), f"rankers.{i}.weights",
                    "is required by the linear aesthetic head (e.g. sa_0_4_vit_l_14_linear.pth)")
            require("{prompt}" in ranker.prompt_template, f"rankers.{i}.prompt_template", "must contain {prompt}")
        r = self.finetune.timestep_range
        require(len(r) == 2 and 0 <= r[0] < r[1] <= 1, "finetune.timestep_range",
                "must be [low, high] with 0 <= low < high <= 1")
