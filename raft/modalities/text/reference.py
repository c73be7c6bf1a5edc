"""The starting policy as a reference: per-sample log-ratios (KL-regularized ranking) and KL to the start.

Under LoRA the reference is the policy with its adapter disabled (no second copy of the weights); under full
fine-tuning it is a frozen copy of the starting model. Both distributions are taken at the sampling
temperature, the distribution the responses were drawn from, and scored on the token ids actually sampled
(text that came from a file or a server, which has none, is tokenized). The policy's side of a log-ratio is what
its sampler recorded while sampling when it can be (raft/modalities/text/sampler.py), so ranking runs the
reference alone.
"""

from __future__ import annotations

import torch

from raft.interface import (META_FINISHED, META_LOGPROB, META_PROMPT_SENT, META_SETTINGS, META_TOKEN_IDS, ReferenceModel,
                            Sample)
from raft.modalities.text.model import TextPolicy, last_logits_only, picked_logprobs, weights_fingerprint, with_cache


def response_ids(policy: TextPolicy, sample: Sample) -> list[int]:
    """The response's token ids as sampled (EOS included when it stopped), or its text tokenized."""
    if sample.meta.get(META_TOKEN_IDS) is not None:
        return list(sample.meta[META_TOKEN_IDS])
    ids = policy.tokenizer(sample.output, add_special_tokens=False)["input_ids"]
    return ids + [policy.tokenizer.eos_token_id] if sample.meta.get(META_FINISHED, True) else ids


class TextReference(ReferenceModel):
    def __init__(self, policy: TextPolicy, load_start: callable, temperature: float, max_length: int,
                 batch_size: int = 16, starts_at_start: bool = True, eval_temperature: float | None = None,
                 exact_eval_kl: bool = True):
        """`load_start()` returns the starting model; it is only called under full fine-tuning.
        `starts_at_start`: the policy holds the starting weights now (False when resumed from a checkpoint)."""
        self.policy, self.max_length, self.batch_size = policy, max_length, batch_size
        self._starts_at_start, self._start_fingerprint = starts_at_start, None
        # each sample is judged at the temperature it was drawn at: training candidates at generation.temperature,
        # held-out samples at eval.temperature
        self.temperature = temperature if temperature > 0 else 1.0
        eval_temperature = temperature if eval_temperature is None else eval_temperature
        self.eval_temperature = eval_temperature if eval_temperature > 0 else 1.0
        self.exact_eval_kl = exact_eval_kl
        self.adapter = hasattr(policy.model, "disable_adapter")  # a peft model
        self.frozen: dict[torch.dtype | None, torch.nn.Module] = {}  # by dtype: None, the weights' own
        self._load_start = load_start

    def _frozen_model(self, dtype: torch.dtype | None = None) -> torch.nn.Module:
        """The starting model, loaded on first use; in `dtype` (model.inference_dtype) for ranking and evaluation,
        in the weights' own dtype for PPO's per-token penalty, which the training forward is compared with."""
        if dtype not in self.frozen:
            model = self._load_start().to(self.policy.device).eval()
            for parameter in model.parameters():
                parameter.requires_grad_(False)
            self.frozen[dtype] = model.to(dtype) if dtype is not None else model
        return self.frozen[dtype]

    @torch.no_grad()
    def measure(self, samples: list[Sample], temperature: float | None = None,
                exact_kl: bool = True) -> tuple[list[float], list[float]]:
        """(log-ratio of the sampled tokens, exact KL) per sample, each summed over the response, at `temperature`
        (default: the training samples' one). Without `exact_kl` the KLs are nan, and a sample whose sampler
        recorded its log-probability at that temperature (meta[META_LOGPROB]) needs no forward pass of the policy."""
        temperature = temperature or self.temperature
        if not samples:
            return [], []
        if self._unchanged():  # nothing trained yet: both are 0, no forward pass needed
            return [0.0] * len(samples), [0.0] * len(samples)
        policy = self.policy
        by_prompt: dict[str, list[int]] = {}
        for index, sample in enumerate(samples):
            by_prompt.setdefault(sample.prompt, []).append(index)
        ratios, kls = [0.0] * len(samples), [float("nan")] * len(samples)
        model = policy.inference_model()  # both sides in model.inference_dtype, as the sampler recorded its side
        was_training = policy.model.training
        policy.model.eval()
        for batch in self._batches(list(by_prompt.values())):
            indices = [i for group in batch for i in group]
            prompts = [policy.encode_prompt(samples[group[0]].prompt) for group in batch]
            responses = [[response_ids(policy, samples[i])[: self.max_length - 1] for i in group] for group in batch]
            flat = [r for group in responses for r in group]
            recorded = [self._recorded_logprob(samples[i], len(r), temperature) for i, r in zip(indices, flat)]
            width = max(1, max(map(len, flat)))
            index = torch.tensor([r + [0] * (width - len(r)) for r in flat], device=policy.device).unsqueeze(-1)
            mask = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in flat], device=policy.device)
            # the whole distributions only for the exact KL; else just the sampled tokens' log-probabilities
            keep = None if exact_kl else index
            if self.adapter:
                with model.disable_adapter():
                    theirs = self._response_logprobs(model, prompts, responses, temperature, keep)
            else:
                theirs = self._response_logprobs(self._frozen_model(policy.inference_dtype), prompts, responses,
                                                 temperature, keep)

            def summed(logprobs):  # over each response's sampled tokens
                return ((logprobs if keep is not None else logprobs.gather(-1, index).squeeze(-1)) * mask).sum(-1)

            their_sums = summed(theirs)
            if exact_kl or any(value is None for value in recorded):
                mine = self._response_logprobs(model, prompts, responses, temperature, keep)
                my_sums = summed(mine).tolist()
                if exact_kl:
                    kl = ((mine.exp() * (mine - theirs)).sum(-1) * mask).sum(-1)
                    for position, sample_index in enumerate(indices):
                        kls[sample_index] = float(kl[position])
            else:
                my_sums = recorded
            for position, sample_index in enumerate(indices):
                ratios[sample_index] = float(my_sums[position]) - float(their_sums[position])
        policy.model.train(was_training)
        return ratios, kls

    def _recorded_logprob(self, sample: Sample, length: int, temperature: float) -> float | None:
        """The policy's log-probability of the sample as its sampler recorded it, when that is log pi(y|x) itself: the
        same tokens, prompt and temperature; else None (text from elsewhere, a response cut to max_length, or drawn
        at another temperature, from a magic prompt or a sampling-only system prompt)."""
        meta = sample.meta
        settings = meta.get(META_SETTINGS) or {}
        same_context = meta.get(META_PROMPT_SENT) == sample.prompt and "system_prompt" not in settings
        same_tokens = meta.get(META_TOKEN_IDS) is not None and len(meta[META_TOKEN_IDS]) == length
        drawn_at = settings.get("temperature") or 1.0
        if meta.get(META_LOGPROB) is None or not (same_context and same_tokens and drawn_at == temperature):
            return None
        return meta[META_LOGPROB]

    @torch.no_grad()
    def token_logprobs(self, batch: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
        """log pi_0 of each labelled token of a collated batch (raft/modalities/text/sft.py's layout) at
        `temperature`: the per-token reference of PPO's KL penalty."""
        from raft.modalities.text.sft import label_logprobs

        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self.adapter:
            with self.policy.model.disable_adapter():
                logits = self.policy.model(**inputs).logits
        else:
            logits = self._frozen_model()(**inputs).logits
        return label_logprobs(logits, batch["labels"], temperature)[0]

    def _batches(self, groups: list[list[int]]) -> list[list[list[int]]]:
        """Whole prompts' groups of samples, about `batch_size` samples per forward pass."""
        batches, current = [], []
        for group in groups:
            if current and sum(map(len, current)) + len(group) > self.batch_size:
                batches.append(current)
                current = []
            current.append(group)
        return batches + ([current] if current else [])

    def _response_logprobs(self, model, prompts: list[list[int]], responses: list[list[list[int]]],
                           temperature: float, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probabilities at the sampling temperature of every response position, [responses, length, vocab]; with
        `tokens` ([responses, length, 1] token ids), only theirs, [responses, length].

        Each prompt is encoded once and its key/value cache shared by its responses (K samples per prompt make
        this several times cheaper than encoding prompt + response for each)."""
        from transformers import DynamicCache

        device = self.policy.device
        pad = self.policy.tokenizer.pad_token_id
        longest = [max(1, *map(len, group)) for group in responses]
        prompts = [ids[max(0, len(ids) - (self.max_length - n)):] for ids, n in zip(prompts, longest)]
        width = max(map(len, prompts))
        prompt_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        cache = DynamicCache(config=getattr(model, "config", None))
        first = model(input_ids=prompt_ids, attention_mask=prompt_mask,
                      position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0), **with_cache(model, cache), use_cache=True,
                      logits_to_keep=last_logits_only(width)).logits  # [prompts, 1, vocab]: each response's first token

        owner = torch.tensor([g for g, group in enumerate(responses) for _ in group], device=device)
        flat = [r for group in responses for r in group]
        length = max(1, max(map(len, flat)))
        cache.batch_select_indices(owner)
        response_ids = torch.tensor([r + [pad] * (length - len(r)) for r in flat], device=device)
        response_mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in flat], device=device)
        positions = prompt_mask.sum(-1)[owner, None] + torch.arange(length, device=device)[None]
        rest = model(input_ids=response_ids, attention_mask=torch.cat([prompt_mask[owner], response_mask], dim=1),
                     position_ids=positions, **with_cache(model, cache), use_cache=True).logits
        logits = torch.cat([first[owner], rest[:, :-1]], dim=1).float() / temperature  # position t: response token t
        if tokens is None:
            return torch.log_softmax(logits, dim=-1)
        return picked_logprobs(logits, tokens.squeeze(-1))

    def _unchanged(self) -> bool:
        """Whether the policy still holds the starting weights (a cheap fingerprint of its trainable ones)."""
        fingerprint = self._fingerprint()
        if self._start_fingerprint is None:
            self._start_fingerprint = fingerprint if self._starts_at_start else ()
        return fingerprint == self._start_fingerprint

    def _fingerprint(self) -> tuple:
        return weights_fingerprint(self.policy.model)

    def log_ratios(self, samples: list[Sample]) -> list[float]:
        return self.measure(samples, exact_kl=False)[0]

    def kl_to_start(self, samples: list[Sample]) -> list[float]:
        """Per sample, the exact KL summed over its response positions, or (eval.kl sampled) its log-ratio: both
        average to KL(pi || pi_0) over samples drawn from the policy."""
        ratios, kls = self.measure(samples, self.eval_temperature, exact_kl=self.exact_eval_kl)
        return kls if self.exact_eval_kl else ratios


def starting_model_loader(model_config) -> callable:
    """How to get the starting weights under full fine-tuning: the configured model, loaded again on first use.

    Loaded the same way whether the run is new or resumed (a deep copy of the policy gives the same weights but
    not always the same kernels, and a resumed run must reproduce the uninterrupted one exactly)."""
    from raft.modalities.text.config import LoraConfig
    from raft.modalities.text.model import load_policy

    return lambda: load_policy(model_config, LoraConfig(), None).model
