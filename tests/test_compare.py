"""`raft compare` and best-of-K: budgets, each method's settings, per-process measurements, the spread over
seeds, the report and its plots, and a full tiny comparison."""

import itertools
import json
import math
import sys

import pytest

import raft
from raft.baselines.best_of_k import kl_bound, run_best_of_k
from raft.baselines.compare import (METHODS, compare, curve, frontier, markdown_report, method_settings, parse_seeds,
                                    plot_frontier, run_measured, run_summary, seed_statistics, with_budget)
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



DEFENDED = ["kl.beta=0.1", "kl.adaptive=true", "selection.diversity.max_similarity=0.8",
            "selection.diversity.max_opening_share=0.5", "finetune.replay.share=0.5", "guard.max_kl=20",
            "guard.min_distinct_2_ratio=0.3", "guard.max_opening_share=0.9", "generation.temperature=0.9"]
DEFENCES_OFF = {("kl", "beta"): 0.0, ("kl", "adaptive"): False, ("selection", "diversity", "max_similarity"): None,
                ("selection", "diversity", "max_opening_share"): None, ("finetune", "replay", "share"): 0.0,
                ("guard", "max_kl"): None, ("guard", "min_distinct_2_ratio"): None, ("guard", "max_opening_share"): None,
                ("guard", "min_diversity_ratio"): None}


def setting(data: dict, path: tuple):
    for key in path:
        data = data[key]
    return data


def test_only_the_defended_raft_keeps_the_collapse_defences():
    shared = to_dict(load_config(TextPPOConfig, None, DEFENDED))
    raft_run = method_settings(shared, "raft", "runs/raft-seed0")
    assert raft_run == {**{k: v for k, v in shared.items() if k != "ppo"}, "run_dir": "runs/raft-seed0"}  # as given
    assert "ppo" not in raft_run and raft_run["finetune"]["objective"] == "sft"
    for method in ("raft_undefended", "rrhf", "ppo", "best_of_k"):
        data = method_settings(shared, method, f"runs/{method}-seed1", seed=1)
        assert {path: setting(data, path) for path in DEFENCES_OFF} == DEFENCES_OFF, method
        assert data["generation"]["temperature"] == 0.9 and data["seed"] == 1 and data["kl"]["target"] == 4.0
        assert data["selection"]["diversity"]["features"] == "auto" and data["finetune"]["replay"]["weight"] == 1.0
    undefended = method_settings(shared, "raft_undefended", "runs/u")
    assert undefended["finetune"]["objective"] == "sft" and undefended["selection"]["strategy"] == "local"
    rrhf = method_settings(shared, "rrhf", "runs/rrhf")
    assert rrhf["finetune"]["objective"] == "rrhf" and rrhf["selection"]["strategy"] == "all" and "ppo" not in rrhf
    assert method_settings(shared, "ppo", "runs/ppo")["ppo"]["kl_coef"] == 0.05
    shared["finetune"]["objective"] = "rrhf"
    assert method_settings(shared, "raft", "runs/raft")["finetune"]["objective"] == "sft"
    for method in METHODS:  # every settings file is a valid config
        load_config(TextPPOConfig, None, base=method_settings(shared, method, "runs/x"))


def test_seeds_and_methods_are_checked_before_anything_runs(tmp_path):
    assert parse_seeds(None) is None and parse_seeds("0, 1,2") == [0, 1, 2]
    with pytest.raises(RaftError, match="^compare: --seeds must be comma-separated integers, got '0,x'$"):
        parse_seeds("0,x")
    with pytest.raises(RaftError, match="--seeds must be >= 0"):
        parse_seeds("-1")
    config = load_config(TextPPOConfig, None, [])
    for methods, seeds, message in [(["raft", "dpo"], None, "unknown method 'dpo'"),
                                    (["raft", "raft"], None, "method 'raft' is listed twice"),
                                    (["raft"], [1, 1], "seed '1' is listed twice")]:
        with pytest.raises(RaftError, match=message):
            compare(config, methods, tmp_path / "out", "raft compare", seeds=seeds)
    assert not (tmp_path / "out").exists()


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


def synthetic_run(method: str, seed: int, rewards: list[float], kls: list[float], returncode: int = 0) -> dict:
    """A run's result as compare records it: metrics rows of iterations 0, 1, ... (best-of-K: one row)."""
    rows = []
    for i, (reward, kl) in enumerate(zip(rewards, kls)):
        rows.append({"iteration": i, "samples": 0 if i == 0 else 8, "eval/reward_mean": reward,
                     "eval/reward_sem": 0.01, "eval/distinct_2": 0.8 - 0.2 * i, "eval/perplexity": 50.0 + 5 * i,
                     "eval/top_opening_share": 0.1 * (i + 1), "eval/kl_to_start": kl,
                     "time/generate": 0.0 if i == 0 else 2.0, "time/finetune": 0.0 if i == 0 else 1.0 + seed})
    if method == "best_of_k":
        rows = [{"iteration": 0, "eval/reward_mean": rewards[0], "eval/distinct_2": 0.6, "eval/perplexity": 50.0,
                 "best_of_k/k": 3, "best_of_k/kl_bound": kl_bound(3), "time/evaluate": 1.0}]
    return {"method": method, "seed": seed, "returncode": returncode, "wall_seconds": 10.0,
            "peak_rss_bytes": 2**30 * (1 + seed), "load_average": [1.0, 1.5], "rows": rows,
            **({"top_opening_share": 0.25} if method == "best_of_k" else {})}


def test_runs_are_summed_up_against_their_seeds_start_and_spread_over_seeds():
    start = synthetic_run("raft", 0, [0.2], [0.0])["rows"][0]
    summary = run_summary(synthetic_run("raft", 0, [0.2, 0.4, 0.5], [0.0, 1.0, 3.0]), start)
    assert summary == pytest.approx({
        "reward": 0.5, "delta": 0.3, "distinct_2": 0.4, "distinct_2_ratio": 0.5, "top_opening_share": 0.3,
        "perplexity": 60.0, "perplexity_change": 20.0, "kl": 3.0, "iterations": 2, "train_seconds": 6.0,
        "peak_rss_gib": 1.0})
    best = run_summary(synthetic_run("best_of_k", 0, [0.35], [0.0]), start)
    assert best["kl"] == pytest.approx(kl_bound(3)) and best["delta"] == pytest.approx(0.15)
    assert best["top_opening_share"] == 0.25 and best["iterations"] == 0 and best["train_seconds"] == 0
    assert math.isnan(run_summary(synthetic_run("raft", 0, [0.2, 0.4], [0.0, 1.0]), None)["delta"])

    spread = seed_statistics([{"reward": 0.5, "kl": 1.0}, {"reward": 0.7, "kl": math.nan}, {"reward": 0.9, "kl": 3.0}])
    assert spread["reward"] == pytest.approx((0.7, 0.2))  # the sample standard deviation: n - 1
    assert spread["kl"] == pytest.approx((2.0, math.sqrt(2)))  # a missing value is left out
    assert seed_statistics([{"reward": 0.5}]) == {"reward": (0.5, None)}  # one seed: no spread
    assert math.isnan(seed_statistics([{"kl": math.nan}])["kl"][0])


def synthetic_results() -> dict:
    results = {}
    for seed in (0, 1):
        results[f"best_of_k-seed{seed}"] = synthetic_run("best_of_k", seed, [0.3 + 0.1 * seed], [0.0])
        results[f"raft-seed{seed}"] = synthetic_run("raft", seed, [0.2, 0.3, 0.4 + 0.2 * seed], [0.0, 0.5, 1.0])
        results[f"raft_undefended-seed{seed}"] = synthetic_run("raft_undefended", seed, [0.2, 0.6, 0.9], [0.0, 5.0, 20.0])
    results["ppo-seed0"] = synthetic_run("ppo", 0, [0.2, 0.25], [0.0, 0.2])
    results["ppo-seed1"] = synthetic_run("ppo", 1, [0.2], [0.0], returncode=1)
    return results


def test_report_gives_mean_and_spread_per_method_and_every_seed():
    shared = to_dict(load_config(TextPPOConfig, None, DEFENDED))
    text = markdown_report(synthetic_results(), shared, "raft compare --seeds 0,1", 18, None, [0, 1])
    lines = text.splitlines()
    defended = next(line for line in lines if line.startswith("| RAFT (defended) | 2 |"))
    assert "| 0.500 ± 0.141 | +0.300 ± 0.141 |" in defended  # rewards 0.4 and 0.6 against starts of 0.2
    assert "| 1.00 ± 0.00 |" in defended  # KL to start: the last row's eval/kl_to_start
    assert next(line for line in lines if line.startswith("| RAFT (undefended) | 2 |"))
    assert "| PPO | 1 (1 failed) | 0.250 | +0.050 |" in text  # one seed finished: its value, no spread
    assert f"| ≤ {kl_bound(3):.2f} ± 0.00 (bound) |" in text and "| best-of-3 (inference) | 1 |" in text
    assert "| PPO | 1 | failed (exit 1, see runs/ppo-seed1.log) |" in text
    assert text.count("| RAFT (defended) | ") == 3  # the mean line and one line per seed
    assert "seeds 0, 1" in text and "kl.beta=0.1 (adaptive: true" in text and "guard: max_kl=20" in text
    assert "![held-out reward against KL to the starting model](reward_vs_kl.png)" in text
    for header in ("| method | seeds |", "| method | seed |"):  # every line of both tables has every column
        first = next(i for i, line in enumerate(lines) if line.startswith(header))
        table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[first:]))
        assert len(table) > 4 and len({line.count("|") for line in table}) == 1, table


def test_frontier_plots_reward_against_kl_to_start(tmp_path):
    rows = [{"iteration": 0, "eval/reward_mean": 0.2}, {"iteration": 1, "eval/reward_mean": 0.4, "eval/kl_to_start": 2.0},
            {"iteration": 2, "eval/reward_mean": 0.5}]  # no KL recorded: no point
    assert frontier(rows) == ([0.0, 2.0], [0.2, 0.4])
    path = tmp_path / "reward_vs_kl.png"
    plot_frontier(synthetic_results(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


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
def test_compare_runs_every_method_per_seed_and_writes_the_report(tiny_model_dir, prompt_file, reference_file,
                                                                   tmp_path):
    defences = ["kl.beta=0.05", "selection.diversity.max_opening_share=0.5", "finetune.replay.share=0.5",
                f"finetune.replay.texts={reference_file}", "guard.max_kl=1000"]
    overrides = tiny_overrides(tiny_model_dir, prompt_file, tmp_path / "unused", reference_file) + [
        "ppo.learning_rate=1e-3", *defences]
    config = load_config(TextPPOConfig, None, overrides)
    out = tmp_path / "report"
    report = compare(config, list(METHODS), out, "raft compare ...", budget_samples=18, seeds=[0, 1])
    results = json.loads((out / "results.json").read_text())["results"]
    assert list(results) == [f"{m}-seed{s}" for s in (0, 1) for m in METHODS]
    for name, result in results.items():
        assert result["returncode"] == 0, (out / "runs" / f"{name}.log").read_text()[-2000:]
        assert result["peak_rss_bytes"] > 100 * 2**20 and result["wall_seconds"] > 0
        assert f"seed: {result['seed']}\n" in (out / "runs" / name / "config.yaml").read_text()
        if result["method"] == "best_of_k":
            assert result["rows"][0]["best_of_k/k"] == 3 and 0 < result["top_opening_share"] <= 1
            continue
        rows = result["rows"]
        assert [r["iteration"] for r in rows] == [0, 1, 2] and sum(r["samples"] for r in rows[1:]) == 18
        assert rows[0]["eval/kl_to_start"] == 0 and 0 < abs(rows[-1]["eval/kl_to_start"]) < 50  # it moved (a sampled estimate)
        # KL-regularized ranking ran in the defended RAFT alone
        assert ("kl/beta" in rows[1]) == (result["method"] == "raft"), name
    starts = {json.dumps(r["rows"][0]["eval/reward_mean"]) for r in results.values() if r["method"] != "best_of_k"}
    assert len(starts) == 1  # one starting policy, one held-out set: seeds change training, not evaluation
    first, second = (results[f"raft_undefended-seed{s}"]["rows"][1] for s in (0, 1))
    assert first["reward/policy_mean"] != second["reward/policy_mean"]  # the seed reached the sampler

    text = report.read_text()
    assert "raft compare ..." in text and "seeds 0, 1" in text
    for label in ("starting policy", "best-of-3 (inference)", "RAFT (defended)", "RAFT (undefended)", "RRHF", "PPO"):
        assert f"| {label} | 2 |" in text  # the mean over both seeds
    for seed in (0, 1):
        assert f"| RAFT (undefended) | {seed} |" in text and f"| RAFT (defended) | {seed} |" in text
    assert f"≤ {kl_bound(3):.2f} ± 0.00 (bound)" in text and f"≤ {kl_bound(3):.2f} (bound)" in text
    assert math.isclose(kl_bound(8), math.log(8) - 7 / 8)
    for png in ("reward_vs_wallclock.png", "reward_vs_samples.png", "reward_vs_kl.png"):
        assert (out / png).stat().st_size > 5000
    with pytest.raises(RaftError, match="already holds runs"):
        compare(config, ["raft"], out, "again")


@pytest.mark.parametrize("args, expected", [
    (["compare", "--budget-samples", "many"], "--budget-samples must be an integer, got 'many'"),
    (["compare", "--methods", "raft,dpo"], "compare: unknown method 'dpo'"),
    (["compare", "--seeds", "x"], "compare: --seeds must be comma-separated integers, got 'x'"),
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
