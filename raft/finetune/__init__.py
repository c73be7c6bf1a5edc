"""Fine-tuning, once for every modality and objective: `Trainer` (raft/finetune/trainer.py) on accelerate, the
processes of a run (raft/finetune/distributed.py) and the objectives' pure losses (raft/finetune/losses.py)."""
