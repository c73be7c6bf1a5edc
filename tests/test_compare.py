"""`raft compare` and best-of-K: budgets, per-process measurements, the KL measurement and a full tiny comparison."""

import json
import math
import sys

import pytest

import raft
from raft.baselines.best_of_k import kl_bound, run_best_of_k
from raft.baselines.compare import compare, curve, kl_to_reference, method_settings, run_measured, with_budget
from raft.baselines.ppo import TextPPOConfig
from raft.config import load_config, to_dict
from raft.errors import RaftError

from conftest import tiny_overrides


def test_budget_gives_every_method_the_same_iterations_or_clock():
    shared = to_dict(load_config(TextPPOConfig, None, ["prompts_per_iteration=4", "samples_per_prompt=3"]))
    assert with_budget(shared, 30, None)["iterations"] == 2  # 12 samples per iteration; what is left is unused
    timed = with_budget(shared, None, 90)
    assert timed["max_train_seconds"] == 90.0 and timed["iterations"] >= 1000
    with pytest.raises(RaftError, match="less than one iteration's samples"):
        with_budget(shared, 5, None)

    rrhf = method_settings(shared, "rrhf", "runs/rrhf")
    assert rrhf["finetune"]["objective"] == "rrhf" and rrhf["selection"]["strategy"] == "all" and "ppo" not in rrhf
    assert method_settings(shared, "ppo", "runs/ppo")["ppo"]["kl_coef"] == 0.05
    shared["finetune"]["objective"] = "rrhf"
    assert method_settings(shared, "raft", "runs/raft")["finetune"]["objective"] == "sft"


def test_each_process_peak_memory_is_its_own(tmp_path):
    allocate = "import time; x = bytearray(400 * 2**20); x[::4096] = b'1' * len(x[::4096]); del x; time.sleep(0.5)"
    big = run_measured([sys.executable, "-c", allocate], tmp_path / "big.log")
    small = run_measured([sys.executable, "-c", "import time; time.sleep(0.5)"], tmp_path / "small.log")
    assert big["returncode"] == small["returncode"] == 0
    assert big["peak_rss_bytes"] > 400 * 2**20
    assert small["peak_rss_bytes"] < 100 * 2**20  # its own peak, not the parent's (pytest with torch loaded)
    failed = run_measured([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "failed.log")
    assert failed["returncode"] == 3 and failed["wall_seconds"] > 0


def test_curves_accumulate_samples_and_training_time_but_not_evaluation():
    rows = [{"iteration": 0, "eval/reward_mean": 0.1, "time/evaluate": 5.0},
            {"iteration": 1, "samples": 8, "eval/reward_mean": 0.2, "eval/reward_sem": 0.01,
             "time/generate": 2.0, "time/finetune": 1.0, "time/evaluate": 5.0},
            {"iteration": 2, "samples": 8, "eval/reward_mean": 0.3, "time/generate": 2.0, "time/finetune": 3.0}]
    assert curve(rows, "samples") == ([0, 8, 16], [0.1, 0.2, 0.3], [0.0, 0.01, 0.0])
    assert curve(rows, "seconds")[0] == [0.0, 3.0, 8.0]


def test_kl_to_reference_is_zero_for_the_starting_policy(tiny_model_dir, prompt_file, tmp_path):
    config = raft.load_config("text", overrides=tiny_overrides(tiny_model_dir, prompt_file, tmp_path / "run")
                              + ["iterations=0"])
    run_dir = raft.run(config)
    assert kl_to_reference(config, [run_dir]) == [pytest.approx(0.0, abs=1e-6)]


def test_best_of_k_answers_with_the_best_of_each_group_of_candidates(tiny_model_dir, prompt_file, tmp_path):
    overrides = tiny_overrides(tiny_model_dir, prompt_file, tmp_path / "run") + ["samples_per_prompt=4"]
    run_dir = run_best_of_k(raft.load_config("text", overrides=overrides))
    folder = run_dir / "iterations/iter-0000"
    candidates = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    chosen = [json.loads(line) for line in (folder / "eval_samples.jsonl").read_text().splitlines()]
    assert len(candidates) == 4 * 2 * 4 and len(chosen) == 4 * 2  # eval prompts x answers (x K candidates)
    for answer, start in zip(chosen, range(0, len(candidates), 4)):
        group = candidates[start : start + 4]
        assert {c["prompt"] for c in group} == {answer["prompt"]}
        assert answer["reward"] == max(c["reward"] for c in group)
    row = json.loads((run_dir / "metrics.jsonl").read_text())
    assert row["eval/reward_mean"] == pytest.approx(sum(a["reward"] for a in chosen) / len(chosen))
    assert row["eval/reward_mean"] >= row["best_of_k/candidate_reward_mean"]
    assert row["best_of_k/kl_bound"] == pytest.approx(math.log(4) - 3 / 4)


@pytest.mark.slow
def test_compare_runs_every_method_and_writes_the_report(tiny_model_dir, prompt_file, reference_file, tmp_path):
    overrides = tiny_overrides(tiny_model_dir, prompt_file, tmp_path / "unused", reference_file) + [
        "ppo.learning_rate=1e-3"]
    config = load_config(TextPPOConfig, None, overrides)
    out = tmp_path / "report"
    report = compare(config, ["best_of_k", "raft", "rrhf", "ppo"], out, "raft compare ...", budget_samples=18)
    results = json.loads((out / "results.json").read_text())["results"]
    for method in ("best_of_k", "raft", "rrhf", "ppo"):
        result = results[method]
        assert result["returncode"] == 0, (out / "runs" / f"{method}.log").read_text()[-2000:]
        assert result["peak_rss_bytes"] > 100 * 2**20 and result["wall_seconds"] > 0
    for method in ("raft", "rrhf", "ppo"):
        rows = results[method]["rows"]
        assert [r["iteration"] for r in rows] == [0, 1, 2] and sum(r["samples"] for r in rows[1:]) == 18
        assert 0 < results[method]["kl_to_reference"] < 50  # they moved, and the KL is measured the same way
    assert results["raft"]["rows"][0]["eval/reward_mean"] == results["ppo"]["rows"][0]["eval/reward_mean"]
    assert results["best_of_k"]["rows"][0]["best_of_k/k"] == 3

    text = report.read_text()
    assert "raft compare ..." in text
    for label in ("starting policy", "best-of-3 (inference)", "| RAFT |", "| RRHF |", "| PPO |"):
        assert label in text
    assert f"≤ {kl_bound(3):.2f} (bound)" in text
    assert math.isclose(kl_bound(8), math.log(8) - 7 / 8)
    for png in ("reward_vs_wallclock.png", "reward_vs_samples.png"):
        assert (out / png).stat().st_size > 5000
    with pytest.raises(RaftError, match="already holds runs"):
        compare(config, ["raft"], out, "again")


@pytest.mark.parametrize("args, expected", [
    (["compare", "--budget-samples", "many"], "--budget-samples must be an integer, got 'many'"),
    (["compare", "--methods", "raft,dpo"], "compare: unknown method 'dpo'"),
    (["ppo", "ppo.epochs=0"], "config: ppo.epochs must be >= 1"),
    (["best-of-k", "ppo.epochs=2"], "unknown key 'ppo'"),  # best-of-k takes the text settings alone
])
def test_baseline_commands_refuse_bad_input_in_one_line(args, expected):
    import subprocess

    result = subprocess.run([sys.executable, "-m", "raft", *args], capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("raft: error:")]
    assert result.returncode == 2 and len(errors) == 1 and expected in errors[0], result.stderr[-2000:]


def test_max_train_seconds_stops_the_loop_between_iterations(tiny_model_dir, prompt_file, tmp_path, one_thread):
    overrides = tiny_overrides(tiny_model_dir, prompt_file, tmp_path / "run") + ["iterations=4", "max_train_seconds=1e-6"]
    run_dir = raft.run(raft.load_config("text", overrides=overrides))
    # evaluation does not count, so iteration 1 starts; its training spends the budget, so iteration 2 does not
    assert json.loads((run_dir / "state.json").read_text()) == {"completed_iteration": 1}
