"""Text modality: Hugging Face causal LMs aligned with any text reward."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from raft.interface import Components, Modality
from raft.rankers import with_aggregation, with_timeout
from raft.modalities.text.config import TextRaftConfig
from raft.modalities.text.data import load_replay_texts, load_text_data
from raft.modalities.text.diversity import FEATURES, opening_of
from raft.modalities.text.discard import build_discard_rules
from raft.modalities.text.evaluate import TextEvaluator
from raft.modalities.text.generators import build_external_generators, build_generator
from raft.modalities.text.model import load_policy
from raft.modalities.text.ppo import PPOFineTuner
from raft.modalities.text.rankers import build_ranker
from raft.modalities.text.reference import TextReference, starting_model_loader
from raft.modalities.text.rrhf import RrhfFineTuner
from raft.modalities.text.sampler import TextSampler
from raft.modalities.text.sft import TextFineTuner


class TextModality(Modality):
    name = "text"
    config_class = TextRaftConfig

    def build(self, config: TextRaftConfig, checkpoint: Path | None) -> Components:
        data = load_text_data(config.data)  # first: bad data fails before a model is loaded
        discard_rules = build_discard_rules(config.discard)
        external = build_external_generators(config)  # files, servers, vLLM: also before the policy loads
        engine = None
        if config.generation.backend == "vllm":  # the policy's vLLM engine: before the policy too (GPU memory)
            from raft.modalities.text.vllm_policy import start_policy_engine

            engine = start_policy_engine(config)
        replay = config.finetune.replay
        replay_texts = load_replay_texts(replay.texts, replay.field, config.data) if replay.share > 0 else []
        policy = load_policy(config.model, config.finetune.lora, checkpoint, seed=config.seed)
        policy.prompt_budget = check_context(config, policy.model.config)
        eval_generation = config.generation
        if config.eval.temperature is not None:
            eval_generation = dataclasses.replace(config.generation, temperature=config.eval.temperature)
        reference = TextReference(policy, starting_model_loader(config.model), config.generation.temperature,
                                  config.finetune.max_seq_length, eval_temperature=eval_generation.temperature,
                                  starts_at_start=checkpoint is None, exact_eval_kl=config.eval.kl == "exact")
        if config.finetune.objective == "ppo":  # a TextPPOConfig: the reference gives PPO's KL penalty too
            finetuner = PPOFineTuner(policy, config.finetune, config.ppo, reference, config.generation.temperature,
                                     checkpoint)
        else:
            finetuner_class = RrhfFineTuner if config.finetune.objective == "rrhf" else TextFineTuner
            finetuner = finetuner_class(policy, config.finetune, checkpoint, replay_texts=replay_texts)
        diversity = config.selection.diversity
        features = FEATURES["ngram" if diversity.features == "auto" else diversity.features]
        return Components(
            prompts=data.prompts,
            eval_prompts=data.eval_prompts,
            generator=build_generator(config, external, policy, engine),
            policy=TextSampler(policy, eval_generation),  # evaluation: the policy as deployed, no magic prompts
            ranker=with_timeout(with_aggregation(build_ranker(config.rankers, policy.device), config.ranker_aggregation),
                                config.ranker_timeout_s),
            finetuner=finetuner,
            evaluator=TextEvaluator(policy, data.reference_texts, config.eval.batch_size, config.eval.max_tokens,
                                    config.eval.perplexity_every),
            discard_rules=discard_rules,
            reference=reference,
            features=features,
            opening=lambda sample, words: opening_of(sample.output, words),
            eval_samples_per_prompt=config.eval.samples_per_prompt,
            eval_best_of_n=config.eval.best_of_n,
            eval_seed=config.eval.seed,
        )


def check_context(config: TextRaftConfig, model_config) -> int:
    """Refuses, before anything runs, a generation budget the model's context (or a training example) cannot hold;
    returns the prompt budget: the prompt tokens sampling and training both keep."""
    from raft.errors import ConfigError

    context = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    r = config.generation.max_new_tokens_range
    longest, field = ((r[1] - 1, "generation.max_new_tokens_range") if r else
                      (config.generation.max_new_tokens, "generation.max_new_tokens"))
    if isinstance(context, int) and longest >= context:
        raise ConfigError(f"config: {field} ({longest} tokens) must be below the model's context ({context} tokens), "
                          f"which also holds the prompt")
    length = config.finetune.max_seq_length
    if longest >= length:
        raise ConfigError(f"config: finetune.max_seq_length ({length}) must be above {field} ({longest}): a training "
                          f"example holds the prompt and the response")
    return min(length, context) - longest if isinstance(context, int) else length - longest
