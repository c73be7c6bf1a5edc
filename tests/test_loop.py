"""End to end: the RAFT loop on a tiny model built from a config, through the library and the CLI."""

import json
import subprocess
import sys

import pytest

import raft
from raft.errors import ConfigError
from raft.loop import draw_prompts

from conftest import REWARDS, tiny_overrides


def test_two_iterations_write_a_complete_run_directory(tiny_model_dir, prompt_file, reference_file, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM

    config = raft.load_config("text", overrides=tiny_overrides(tiny_model_dir, prompt_file, tmp_path / "run",
                                                                reference_file))
    run_dir = raft.run(config)

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [0, 1, 2]
    for key in ["reward/policy_mean", "reward/selected_mean", "eval/reward_mean", "eval/perplexity",
                "eval/distinct_1", "eval/distinct_2", "eval/mean_words", "train/loss"]:
        assert isinstance(metrics[-1][key], float), key
    assert metrics[1]["reward/selected_mean"] >= metrics[1]["reward/policy_mean"]
    assert (run_dir / "metrics.png").stat().st_size > 1000
    # the plot shows the training metrics too, though iteration 0's row (the plot's first) has only evaluation ones
    from raft.metrics import plotted_metrics

    shown = plotted_metrics(metrics)
    assert {"train/loss", "reward/policy_mean", "eval/reward_mean"} <= set(shown)
    assert not any(name.startswith("time/") for name in shown)

    assert json.loads((run_dir / "state.json").read_text()) == {"completed_iteration": 2}

    samples = datasets.load_dataset("json", data_files=str(run_dir / "iterations/iter-0002/samples.jsonl"),
                                    split="train")
    assert len(samples) == 9 and set(samples["prompt_index"]) == {0, 1, 2}
    assert samples["reward"] == pytest.approx([sum(c in "aeiou" for c in o) / max(1, len(o)) for o in samples["output"]])
    selected = datasets.load_dataset("json", data_files=str(run_dir / "iterations/iter-0002/selected.jsonl"),
                                     split="train")
    assert len(selected) == 3 and all(selected["selected"])
    for p in range(3):  # the kept sample of each prompt is its best
        assert max(r for r, i in zip(samples["reward"], samples["prompt_index"]) if i == p) in selected["reward"]

    reloaded = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints/iter-0002")
    assert reloaded.num_parameters() > 0
    assert not (run_dir / "checkpoints/iter-0001").exists()  # keep_checkpoints=1
    saved = raft.load_config("text", run_dir / "config.yaml")
    assert saved.iterations == 2 and saved.model.name_or_path == str(tiny_model_dir)


def test_lora_run_saves_a_peft_adapter(tiny_model_dir, prompt_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    overrides = tiny_overrides(tiny_model_dir, prompt_file, tmp_path / "run") + [
        "iterations=1", "finetune.lora.enabled=true", "finetune.lora.r=4"]
    run_dir = raft.run(raft.load_config("text", overrides=overrides))
    adapter = run_dir / "checkpoints/iter-0001"
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "model.safetensors").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_prompts_are_drawn_without_repeats_within_an_epoch():
    pool = [f"p{i}" for i in range(10)]
    drawn = [p for it in range(1, 6) for p in draw_prompts(pool, 4, seed=3, iteration=it)]
    assert sorted(drawn[:8]) == sorted(set(drawn[:8]))  # iterations 1-2 stay inside epoch 0
    assert set(drawn[:10]) == set(pool)
    assert draw_prompts(pool, 4, 3, 2) == draw_prompts(pool, 4, 3, 2)
    assert draw_prompts(pool, 4, 3, 2) != draw_prompts(pool, 4, 4, 2)


def run_cli(*args, env=None, cwd=None):
    import os

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "raft", *args], capture_output=True, text=True, env=full_env,
                          cwd=cwd, timeout=300)


def test_cli_help_documents_options():
    result = run_cli("run", "--help")
    assert result.returncode == 0
    assert "finetune.carry_optimizer_state" in result.stdout and "selection.strategy" in result.stdout


def test_cli_config_prints_the_resolved_config(tmp_path):
    result = run_cli("config", "iterations=5")
    assert result.returncode == 0 and "iterations: 5" in result.stdout


def one_line_error(result, expected):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("raft: error:")]
    assert len(lines) == 1 and expected in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("extra, expected", [
    (["finetune.lrr=1"], "unknown key 'finetune.lrr'"),
    (["iterations=many"], "iterations must be an integer, got 'many'"),
    (["model.name_or_path=./no/such/model"], "model.name_or_path: no such directory './no/such/model'"),
    (["model.name_or_path=builtin:gpt-7"], "unknown builtin model 'gpt-7'"),
    (["--modality", "audio"], "unknown modality 'audio'"),
    (["--bogus"], "unknown option --bogus"),
])
def test_cli_bad_input_is_one_line(tiny_model_dir, prompt_file, tmp_path, extra, expected):
    result = run_cli("run", *tiny_overrides(tiny_model_dir, prompt_file, tmp_path / "run"), *extra)
    one_line_error(result, expected)
    assert not (tmp_path / "run").exists()  # nothing written for a run that could not start


def test_cli_empty_prompt_file(tiny_model_dir, prompt_file, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    result = run_cli("run", *tiny_overrides(tiny_model_dir, prompt_file, tmp_path / "run"), f"data.prompts={empty}")
    one_line_error(result, f"data.prompts: '{empty}' is empty")
    assert not (tmp_path / "run").exists()
    result = run_cli("run", *tiny_overrides(tiny_model_dir, prompt_file, tmp_path / "run2"),
                     f"data.prompts={tmp_path / 'missing.jsonl'}")
    one_line_error(result, "does not exist")


@pytest.mark.parametrize("mode, expected", [
    ("raise", "ranker '{spec}' raised ValueError: reward server unavailable"),
    ("nan", "ranker '{spec}' returned NaN or infinite scores for 1 of 9 samples"),
    ("count", "ranker '{spec}' returned 8 scores for 9 samples"),
])
def test_a_failing_ranker_stops_the_run_and_keeps_finished_iterations(tiny_model_dir, prompt_file, tmp_path,
                                                                      mode, expected):
    spec = f"{REWARDS}:broken_from_call"
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tiny_model_dir, prompt_file, run_dir) + [f"rankers.0.function={spec}"]
    # calls: 1 = starting evaluation, 2 = iteration 1 ranking, 3 = its evaluation, 4 = iteration 2 ranking
    result = run_cli("run", *overrides, env={"RAFT_TEST_BREAK": mode, "RAFT_TEST_BREAK_AT": "4"})
    one_line_error(result, expected.format(spec=spec))
    assert json.loads((run_dir / "state.json").read_text()) == {"completed_iteration": 1}
    assert (run_dir / "checkpoints/iter-0001/model.safetensors").is_file()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2

    resumed = run_cli("run", "--resume", str(run_dir), "--trust-run-code")  # the ranker works again
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((run_dir / "state.json").read_text()) == {"completed_iteration": 2}


def test_existing_run_directory_needs_resume(tiny_model_dir, prompt_file, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "something").write_text("x")
    result = run_cli("run", *tiny_overrides(tiny_model_dir, prompt_file, run_dir))
    one_line_error(result, "already exists; pass --resume")


def test_eval_every_skips_held_out_evaluation_but_always_measures_the_last_iteration(tiny_model_dir, prompt_file,
                                                                                     tmp_path, one_thread):
    overrides = tiny_overrides(tiny_model_dir, prompt_file, tmp_path / "run") + ["iterations=3", "eval_every=2",
                                                                                 "kl.beta=0.02"]
    run_dir = raft.run(raft.load_config("text", overrides=overrides))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluated = [m["iteration"] for m in metrics if "eval/reward_mean" in m]
    assert evaluated == [0, 2, 3]  # before training, every 2nd iteration, and the last
    assert "time/evaluate" not in metrics[1] and isinstance(metrics[1]["kl/policy_mean"], float)
    assert not (run_dir / "iterations/iter-0001/eval_samples.jsonl").exists()
    assert (run_dir / "iterations/iter-0002/eval_samples.jsonl").exists()
    samples = [json.loads(line) for line in (run_dir / "iterations/iter-0002/samples.jsonl").read_text().splitlines()]
    assert all(isinstance(s["logprob"], float) and s["logprob"] < 0 for s in samples)  # recorded while sampling


def test_perplexity_every_skips_perplexity_between_but_measures_the_start_and_the_last_evaluation(
        tiny_model_dir, prompt_file, reference_file, tmp_path, one_thread):
    def perplexity_rows(name: str, *extra: str) -> list[int]:
        overrides = tiny_overrides(tiny_model_dir, prompt_file, tmp_path / name, reference_file) + [
            "iterations=3", "eval.perplexity_every=2", *extra]
        rows = [json.loads(line) for line in (raft.run(raft.load_config("text", overrides=overrides))
                                              / "metrics.jsonl").read_text().splitlines()]
        assert all(isinstance(row["eval/distinct_2"], float) for row in rows)  # every evaluation measures the rest
        return [row["iteration"] for row in rows if "eval/perplexity" in row]

    assert perplexity_rows("every-2") == [0, 2, 3]  # the start, every 2nd iteration, the last
    # a guard bound set: any evaluation may be the run's last one, so each measures it
    assert perplexity_rows("guarded", "guard.max_kl=1000") == [0, 1, 2, 3]
    # the time budget makes iteration 1 the last one
    assert perplexity_rows("budget", "max_train_seconds=1e-6") == [0, 1]


def test_eval_every_must_be_positive():
    with pytest.raises(ConfigError, match="eval_every"):
        raft.load_config("text", overrides=["eval_every=0"])


def test_the_plot_leaves_out_timings_flat_metrics_and_best_of_n_panels():
    from raft.metrics import plotted_metrics

    rows = [{"iteration": 0, "eval/reward_mean": 0.2, "eval/best_of_n_reward": 0.5, "time/evaluate": 3.0},
            {"iteration": 1, "samples": 8, "train/loss": 2.0, "kl/beta": 0.02},
            {"iteration": 2, "samples": 8, "train/loss": 1.5, "kl/beta": 0.03, "eval/reward_mean": 0.4}]
    assert plotted_metrics(rows) == ["eval/reward_mean", "train/loss", "kl/beta"]  # samples never changed
    assert plotted_metrics(rows[:1]) == ["eval/reward_mean"]  # one row: nothing is flat yet


def test_kept_set_replay_trains_on_earlier_kept_samples_as_recorded(tiny_model_dir, prompt_file, tmp_path,
                                                                     monkeypatch):
    from raft.interface import META_TOKEN_IDS
    from raft.modalities.text.sft import TextFineTuner

    seen = []
    finetune = TextFineTuner.finetune

    def spy(self, selected, seed):
        seen.append([(s.prompt, s.output, tuple(s.meta[META_TOKEN_IDS]), s.reward) for s in selected])
        return finetune(self, selected, seed)

    monkeypatch.setattr(TextFineTuner, "finetune", spy)
    overrides = [*tiny_overrides(tiny_model_dir, prompt_file, tmp_path / "run"), "iterations=3",
                 "selection.replay_iterations=1"]
    run_dir = raft.run(raft.load_config("text", overrides=overrides))

    def kept(iteration):
        path = run_dir / "iterations" / f"iter-{iteration:04d}" / "selected.jsonl"
        return [(r["prompt"], r["output"], tuple(r["token_ids"]), r["reward"])
                for r in map(json.loads, path.read_text().splitlines())]

    assert len(kept(1)) == len(kept(2)) == len(kept(3)) == 3
    # each iteration trains on the one before's kept samples (tokens as sampled), then its own; one back only
    assert seen == [kept(1), kept(1) + kept(2), kept(2) + kept(3)]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m.get("selection/replayed") for m in metrics] == [None, 0, 3, 3]


@pytest.mark.parametrize("extra, expected", [
    (["finetune.objective=rrhf", "selection.strategy=all"], "selection.replay_iterations"),
    (["selection.replay_iterations=-2"], "selection.replay_iterations"),
])
def test_kept_set_replay_is_refused_where_it_means_nothing(extra, expected):
    with pytest.raises(ConfigError, match=expected):
        raft.load_config("text", overrides=["selection.replay_iterations=2", *extra])
