"""Best-of-K at inference: no training. For each held-out prompt the policy samples K responses, the ranker
scores them and the best is the answer. It is the reference line for what reranking alone buys, at K times
the inference cost; its KL to the policy is at most log K - (K - 1) / K (Beirami et al. 2024).

    raft best-of-k --config my.yaml samples_per_prompt=8

Writes a run directory with iteration 0 only: metrics.jsonl (the same eval/* names as `raft run`),
iterations/iter-0000/samples.jsonl (every candidate) and eval_samples.jsonl (the chosen ones).
"""

from __future__ import annotations

import time
from pathlib import Path

from raft.config import dump_yaml
from raft.loop import open_run_directory, write_samples
from raft.metrics import best_of_k_kl_bound, mean, standard_error
from raft.modalities.text import TextModality
from raft.modalities.text.config import TextRaftConfig
from raft.rankers import score_samples
from raft.selection import apply_discard_rules


kl_bound = best_of_k_kl_bound  # the same bound the loop records for eval.best_of_n


def run_best_of_k(config: TextRaftConfig) -> Path:
    """K = samples_per_prompt candidates per answer; eval.samples_per_prompt answers per held-out prompt."""
    k = config.samples_per_prompt
    run_dir = open_run_directory(config, False, "best-of-k")
    parts = TextModality().build(config, None)
    run_dir.initialize(dump_yaml(config))
    started = time.perf_counter()
    answers = parts.eval_samples_per_prompt
    candidates = parts.policy.generate(parts.eval_prompts, answers * k, seed=parts.eval_seed)
    apply_discard_rules(candidates, parts.discard_rules)  # as in RAFT's selection: rules first, then reward
    score_samples(parts.ranker, candidates)
    chosen = []
    for start in range(0, len(candidates), k):  # candidates come grouped by prompt, answers * k each
        best = max(candidates[start : start + k], key=lambda s: (s.discard_reason is None, s.reward))
        best.selected = True
        chosen.append(best)
    rewards = [s.reward for s in chosen]
    row = {
        "iteration": 0,
        "eval/reward_mean": mean(rewards),
        "eval/reward_sem": standard_error(rewards),
        **parts.evaluator.evaluate(chosen),
        "best_of_k/k": k,
        "best_of_k/candidate_reward_mean": mean(s.reward for s in candidates),
        "best_of_k/kl_bound": kl_bound(k),
        "time/evaluate": time.perf_counter() - started,
    }
    files = {"samples": candidates, "eval_samples": chosen}
    run_dir.commit_iteration(0, lambda folder: write_samples(folder, parts, 0, files), row, save_checkpoint=None,
                             keep_checkpoints=config.keep_checkpoints)
    print(f"best-of-{k}: held-out reward {row['eval/reward_mean']:.4f} ± {row['eval/reward_sem']:.4f} "
          f"(each candidate: {row['best_of_k/candidate_reward_mean']:.4f}); run directory: {run_dir.path}", flush=True)
    return run_dir.path
