"""The policy as a generator: K samples per prompt, batched across prompts.

Three things make it faster than calling `generate(num_return_sequences=K)` one prompt at a time:
batches hold many prompts; prompts of similar length (and max_new_tokens) share a batch, so little is
padded; and each prompt is encoded once, its key/value cache copied to its K samples.

Each sample also carries its log-probability under the policy that drew it (`meta[META_LOGPROB]`, at the sampling
temperature, summed over the sampled tokens), recorded while sampling: KL-regularized ranking then needs only the
reference model's forward pass, not the policy's again (unless the model's generation config changes its scores
before they can be recorded: see `scores_are_the_models`).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from raft.generators.sampling import draw_budgets
from raft.interface import (META_FINISHED, META_GENERATOR, META_LOGPROB, META_PROMPT_SENT, META_PROMPT_TOKENS_CUT,
                            META_SETTINGS, META_TOKEN_IDS, POLICY_GENERATOR, Generator, Sample)
from raft.modalities.text.config import TextGenerationConfig
from raft.modalities.text.model import TextPolicy, last_logits_only, with_cache


class TextSampler(Generator):
    name = POLICY_GENERATOR

    def __init__(self, policy: TextPolicy, config: TextGenerationConfig, progress: bool = True,
                 system_prompt: str | None = None):
        """`system_prompt` replaces model.system_prompt while sampling only (a magic system prompt)."""
        self.policy = policy
        self.config = config
        self.progress = progress
        self.system_prompt = system_prompt

    @torch.no_grad()
    def generate(self, prompts: list[str], samples_per_prompt: int, seed: int) -> list[Sample]:
        k, config = samples_per_prompt, self.config
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        budgets = draw_budgets(config.max_new_tokens, config.max_new_tokens_range, len(prompts), rng)
        encoded, cut = zip(*(self.policy.encode_prompt_cut(p, self.system_prompt) for p in prompts)) if prompts else ((), ())

        model = self.policy.inference_model()  # the trained weights, or their copy in model.inference_dtype
        order = sorted(range(len(prompts)), key=lambda i: (budgets[i], len(encoded[i])))
        per_batch = max(1, config.batch_size // k)
        outputs: dict[int, list[list[int]]] = {}
        logprobs: dict[int, list[list[float] | None]] = {}
        batches = [order[i : i + per_batch] for i in range(0, len(order), per_batch)]
        for batch in tqdm(batches, desc=f"sampling {len(prompts)}x{k}", disable=not self.progress, leave=False):
            rows, row_logprobs = self._sample_batch(model, [encoded[i] for i in batch], k, max(budgets[i] for i in batch))
            for position, index in enumerate(batch):
                outputs[index] = rows[position * k : (position + 1) * k]
                logprobs[index] = row_logprobs[position * k : (position + 1) * k]

        eos_ids = self.policy.eos_ids
        settings = {"temperature": config.temperature, "top_p": config.top_p, "top_k": config.top_k}
        if self.system_prompt is not None:
            settings["system_prompt"] = self.system_prompt
        samples = []
        for index, prompt in enumerate(prompts):
            for tokens, token_logprobs in zip(outputs[index], logprobs[index]):
                tokens = tokens[: budgets[index]]
                end = next((j for j, t in enumerate(tokens) if t in eos_ids), None)
                kept = len(tokens) if end is None else end + 1
                text = self.policy.tokenizer.decode(tokens[:end], skip_special_tokens=True).strip()
                samples.append(Sample(
                    prompt_index=index,
                    prompt=prompt,
                    output=text,
                    meta={
                        META_GENERATOR: self.name,
                        META_PROMPT_SENT: prompt,
                        META_FINISHED: end is not None,  # ended with EOS rather than running out of tokens
                        "new_tokens": kept,
                        META_TOKEN_IDS: tokens[:kept],  # exactly as sampled, EOS included
                        **({META_LOGPROB: float(sum(token_logprobs[:kept]))} if token_logprobs is not None else {}),
                        META_SETTINGS: settings | {"max_new_tokens": budgets[index]},
                        **({META_PROMPT_TOKENS_CUT: cut[index]} if cut[index] else {}),
                    },
                ))
        return samples

    def _sample_batch(self, model: torch.nn.Module, prompt_ids: list[list[int]], k: int,
                      max_new_tokens: int) -> tuple[list[list[int]], list[list[float]]]:
        """New tokens of k samples for each prompt, prompt-major, and the policy's log-probability of each token
        (None for a row when the model's generation config changes the scores before they can be recorded)."""
        policy, config = self.policy, self.config
        width = max(len(ids) for ids in prompt_ids)
        pad = policy.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompt_ids], device=policy.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids], device=policy.device)
        sampling = dict(
            do_sample=config.temperature > 0,
            temperature=config.temperature if config.temperature > 0 else None,
            top_p=config.top_p if config.temperature > 0 else None,
            top_k=config.top_k if config.temperature > 0 else None,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=sorted(policy.eos_ids),
        )
        record = scores_are_the_models(model.generation_config)
        if config.temperature > 0:
            # raft draws the token itself and generate() takes it greedily: torch.multinomial over a 49k vocabulary
            # spent a quarter of the sampling time drawing exponentials on CPUs (see InverseCdfSampling)
            recorder = InverseCdfSampling(config.temperature, config.top_k, config.top_p, record)
            sampling.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            sampling["logits_processor"] = LogitsProcessorList([recorder])
        else:
            recorder = TokenLogprobs(config.temperature) if record else None
            if recorder is not None:
                sampling["logits_processor"] = LogitsProcessorList([recorder])
        # at K = 1 too: generate()'s own prefill asks for the last position's logits through a non-contiguous slice,
        # which with frozen weights (the inference copy) costs a copy of the 49k x 576 output weight per row
        if config.share_prompt_prefill and width > 1:
            cache = self._prefill(model, input_ids[:, :-1], mask[:, :-1])
            if k > 1:  # (at K = 1 it would copy the cache for nothing)
                cache.batch_repeat_interleave(k)
            output = model.generate(input_ids=input_ids.repeat_interleave(k, 0), attention_mask=mask.repeat_interleave(k, 0),
                                    **with_cache(model, cache), **sampling)
        else:  # (num_return_sequences refuses greedy decoding, so copy the rows)
            output = model.generate(input_ids=input_ids.repeat_interleave(k, 0), attention_mask=mask.repeat_interleave(k, 0),
                                    **sampling)
        new_tokens = output[:, width:]
        recorded = recorder.finish(new_tokens) if recorder is not None else None
        return new_tokens.tolist(), (recorded.tolist() if recorded is not None else [None] * len(new_tokens))

    def _prefill(self, model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor):
        """Key/value cache of all prompt tokens but the last (generate feeds that one and samples from it)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        # left padding: positions count real tokens only, as generate() computes them
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        model(input_ids=input_ids, attention_mask=mask, position_ids=positions, **with_cache(model, cache),
              use_cache=True, logits_to_keep=last_logits_only(input_ids.shape[1]))
        return cache


# GenerationConfig settings under which generate() changes the model's scores before custom logits processors see
# them (transformers' _get_logits_processor): a recorder would then record those, not log pi(y|x)
SCORE_CHANGING = ("repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size",
                  "encoder_no_repeat_ngram_size", "bad_words_ids", "sequence_bias", "min_length", "min_new_tokens",
                  "forced_bos_token_id", "forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens",
                  "exponential_decay_length_penalty", "remove_invalid_values")


def scores_are_the_models(generation_config) -> bool:
    """Whether generate() hands custom logits processors the model's own scores (no penalty, ban or forced token
    from the model's generation config, e.g. a shipped repetition_penalty)."""
    from transformers import GenerationConfig

    default = GenerationConfig()
    changed = [n for n in SCORE_CHANGING if getattr(generation_config, n, None) != getattr(default, n, None)]
    guidance = getattr(generation_config, "guidance_scale", None)
    return not changed and guidance in (None, 1, 1.0)


class TokenLogprobs(LogitsProcessor):
    """Records, while generate() samples, each sampled token's log-probability under the model at `temperature`.

    generate() calls it at every step with the tokens so far and the next token's scores (before temperature and
    top-k/top-p, which come after custom processors); the token drawn from step t's scores is only known at step
    t + 1, so each call scores the previous step's draw, and `finish` the last one. It leaves the scores as they
    are, so sampling is unchanged. Tokens after EOS (padding) get log-probabilities too: callers cut them off."""

    def __init__(self, temperature: float):
        self.temperature = temperature if temperature > 0 else 1.0
        self.steps: list[torch.Tensor] = []  # [rows] per scored step
        self.previous: torch.Tensor | None = None  # the last step's log-probabilities, [rows, vocab]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self.steps.append(self.previous.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """[rows, new tokens] log-probabilities of `new_tokens` (generate's output after the prompt)."""
        length = new_tokens.shape[1]
        if len(self.steps) < length and self.previous is not None:  # the last draw, unless a later call scored it
            self.steps.append(self.previous.gather(-1, new_tokens[:, len(self.steps) : len(self.steps) + 1]).squeeze(-1))
        self.previous = None
        if not self.steps:
            return torch.zeros(new_tokens.shape)
        return torch.stack(self.steps[:length], dim=1).cpu()


class InverseCdfSampling(LogitsProcessor):
    """Draws each next token itself, by inverse CDF, and hands generate() scores that are -inf everywhere but there,
    so that generate(do_sample=False) takes it; records the drawn token's log-probability under the model at
    `temperature` (when `record`).

    Why: generate(do_sample=True) draws with torch.multinomial, which on CPUs draws one exponential per vocabulary
    entry per row: 160 ms a step for 64 rows of a 49k vocabulary, a quarter of the offline default's sampling time.
    One uniform per row against the cumulative distribution draws from the same distribution (temperature, then
    top-k, then top-p, transformers' order) for a few ms. Run last, after any processor the model's generation
    config adds (a repetition penalty changes what is drawn from, as it would in generate(do_sample=True), and
    then nothing is recorded: `record` is False)."""

    BLOCK = 1024  # vocabulary entries summed together before the one cumulative sum that locates a draw

    def __init__(self, temperature: float, top_k: int = 0, top_p: float = 1.0, record: bool = True):
        from transformers import TopKLogitsWarper, TopPLogitsWarper

        self.temperature, self.record = temperature, record
        self.warpers = ([TopKLogitsWarper(top_k)] if top_k and top_k > 0 else []) + (
            [TopPLogitsWarper(top_p)] if top_p is not None and top_p < 1.0 else [])
        self.steps: list[torch.Tensor] = []  # [rows] log-probabilities of each step's draw
        self.chosen: torch.Tensor | None = None  # the scores handed back, -inf but at the drawn tokens: reused
        self.drawn: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        tokens, logprobs = self._draw_warped(input_ids, scores) if self.warpers else self._draw(scores)
        if self.record:
            self.steps.append(logprobs)
        # generate() takes the argmax of what this returns before it calls again, so one buffer serves every step
        # (filling a fresh [rows, vocab] tensor with -inf was 3% of a float32 step)
        if self.chosen is None or self.chosen.shape != scores.shape or self.chosen.dtype != scores.dtype:
            self.chosen = torch.full_like(scores, float("-inf"))
        else:
            self.chosen.scatter_(-1, self.drawn, float("-inf"))
        self.drawn = tokens
        return self.chosen.scatter_(-1, tokens, 0.0)

    def _draw(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Temperature only: the token (as [rows, 1]) and its log-probability. Two-level inverse CDF on unnormalised
        weights: a cumulative sum over the vocabulary's blocks locates the draw's block, one over that block its
        token. A log_softmax, exp and cumsum over the whole [rows, vocab] were 15% of a float32 step."""
        rows, vocab = scores.shape
        block = self.BLOCK
        top = scores.max(dim=-1, keepdim=True).values.float()
        weights = torch.sub(scores, top).div_(self.temperature).exp_()  # exp((s - max) / T), the largest 1
        blocks = -(-vocab // block)
        if blocks * block != vocab:
            weights = torch.nn.functional.pad(weights, (0, blocks * block - vocab))
        weights = weights.view(rows, blocks, block)
        block_cdf = weights.sum(-1).cumsum(-1)  # [rows, blocks]
        total = block_cdf[:, -1:]
        draw = torch.rand(rows, 1, device=scores.device) * total
        where = torch.searchsorted(block_cdf, draw, right=True).clamp(max=blocks - 1)
        before = torch.where(where > 0, block_cdf.gather(-1, (where - 1).clamp(min=0)), 0.0)
        inner = weights.gather(1, where[:, :, None].expand(rows, 1, block)).squeeze(1).cumsum(-1)  # [rows, block]
        # rounding can leave the residual a hair outside [0, the block's sum): keep it inside, on tokens of weight > 0
        below_sum = torch.nextafter(inner[:, -1:], torch.zeros_like(inner[:, -1:]))
        residual = torch.minimum((draw - before).clamp(min=0.0), below_sum)
        offset = torch.searchsorted(inner, residual, right=True).clamp(max=block - 1)
        tokens = (where * block + offset).clamp(max=vocab - 1)
        logprobs = (scores.gather(-1, tokens).float() - top).squeeze(-1) / self.temperature - total.squeeze(-1).log()
        return tokens, logprobs

    def _draw_warped(self, input_ids: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Temperature, then top-k and top-p as transformers applies them; the log-probability is the untruncated one."""
        logprobs = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        warped = logprobs
        for warper in self.warpers:
            warped = warper(input_ids, warped)
        cdf = warped.exp().cumsum(dim=-1)
        draw = torch.rand(cdf.shape[0], 1, device=cdf.device) * cdf[:, -1:]
        tokens = torch.searchsorted(cdf, draw, right=True).clamp(max=cdf.shape[1] - 1)
        return tokens, logprobs.gather(-1, tokens).squeeze(-1)

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor | None:
        """[rows, new tokens] log-probabilities of `new_tokens` (None when not recorded). Steps after a row's EOS
        hold its padding's: callers cut them off."""
        if not self.record:
            return None
        if not self.steps:
            return torch.zeros(new_tokens.shape)
        return torch.stack(self.steps[: new_tokens.shape[1]], dim=1).cpu()
