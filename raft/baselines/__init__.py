"""Baselines run in raft's harness (same sampler, rankers, evaluation and run directory): PPO, best-of-K at
inference, and `raft compare`. RRHF runs in the RAFT loop itself (finetune.objective=rrhf)."""
