"""A run killed with SIGKILL in any stage resumes to exactly the result of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import tiny_overrides


def raft_run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "raft", "run", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def outcome(run_dir):
    """Everything a run produced that must not depend on interruptions (timings excluded)."""
    metrics = [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
               for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    iterations = sorted(p.name for p in (run_dir / "iterations").iterdir())
    samples = {name: (run_dir / "iterations" / name / "samples.jsonl").read_text()
               for name in iterations if name != "iter-0000"}
    return metrics, iterations, samples


VARIANTS = {
    "full": [],
    "lora+carried-optimizer": ["finetune.lora.enabled=true", "finetune.lora.r=4", "finetune.carry_optimizer_state=true"],
    "rrhf": ["finetune.objective=rrhf", "selection.strategy=all"],
    # each iteration also trains on every earlier kept set, read back from the run directory
    "kept-replay": ["selection.replay_iterations=-1"],
    # PPO in the loop: value head, optimizer and adapted kl_coef carry over in the checkpoint
    "ppo+lora": ["finetune.objective=ppo", "finetune.lora.enabled=true", "finetune.lora.r=4", "ppo.adaptive_kl=true",
                 "ppo.learning_rate=1e-3"],
}


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, prompt_file, tmp_path_factory):
    results = {}
    for variant, extra in VARIANTS.items():
        run_dir = tmp_path_factory.mktemp("uninterrupted") / variant
        result = raft_run(*tiny_overrides(tiny_model_dir, prompt_file, run_dir), "iterations=3", *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        results[variant] = outcome(run_dir)
    return results


@pytest.mark.parametrize("variant, kill_at", [
    ("full", "0:evaluate"),
    ("full", "2:generate"),
    ("full", "2:rank"),
    ("full", "2:finetune"),
    ("full", "2:save"),
    ("full", "3:commit"),
    ("lora+carried-optimizer", "2:finetune"),
    ("lora+carried-optimizer", "3:commit"),
    ("rrhf", "2:finetune"),
    ("kept-replay", "3:finetune"),
    ("ppo+lora", "2:finetune"),
    ("ppo+lora", "3:commit"),
])
def test_sigkill_then_resume_equals_uninterrupted(uninterrupted, tiny_model_dir, prompt_file, tmp_path, variant,
                                                  kill_at):
    run_dir = tmp_path / "run"
    overrides = [*tiny_overrides(tiny_model_dir, prompt_file, run_dir), "iterations=3", *VARIANTS[variant]]
    killed = raft_run(*overrides, env={"RAFT_KILL_AT": kill_at})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    iteration, stage = kill_at.split(":")
    state = run_dir / "state.json"
    completed = json.loads(state.read_text())["completed_iteration"] if state.exists() else None
    expected_completed = int(iteration) - 1 if int(iteration) > 0 else None
    assert completed == expected_completed

    resumed = raft_run("--resume", str(run_dir), "--trust-run-code")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics, iterations, samples = outcome(run_dir)
    assert iterations == ["iter-0000", "iter-0001", "iter-0002", "iter-0003"]  # none missing, none twice
    assert [m["iteration"] for m in metrics] == [0, 1, 2, 3]
    assert (metrics, iterations, samples) == uninterrupted[variant]
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name]  # *.tmp, *.tmp.png, <name>.<pid>-<id>.tmp
    assert not (run_dir / ".lock").exists()


@pytest.mark.parametrize("fraction", [0.6, 0.85])
def test_sigkill_at_an_arbitrary_moment_then_resume(uninterrupted, tiny_model_dir, prompt_file, tmp_path, fraction):
    """No hook: the process is killed from outside at some moment of its run, wherever it happens to be: `fraction`
    of an iteration after iteration 1 was committed (timed on a first run), so the kill lands mid-run, which the
    test checks."""
    import time

    run_dir = tmp_path / "run"
    overrides = [*tiny_overrides(tiny_model_dir, prompt_file, run_dir), "iterations=3"]

    def launch():
        process = subprocess.Popen([sys.executable, "-m", "raft", "run", *overrides], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        while completed_iteration(run_dir) != 1:  # committed iteration 1
            assert process.poll() is None, "the run ended before committing iteration 1"
            time.sleep(0.02)
        return process, time.perf_counter()

    process, committed = launch()
    process.wait(timeout=300)
    per_iteration = (time.perf_counter() - committed) / 2  # iterations 2 and 3
    shutil_rmtree(run_dir)

    delay = per_iteration * fraction
    for _ in range(3):  # a machine whose load changes can run this launch faster than the timed one: kill sooner
        process, _ = launch()
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL  # killed, not finished before the signal
        if completed_iteration(run_dir) in (1, 2):
            break
        shutil_rmtree(run_dir)
        delay /= 2
    assert completed_iteration(run_dir) in (1, 2)  # the kill landed mid-run

    resumed = raft_run("--resume", str(run_dir), "--trust-run-code")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert outcome(run_dir) == uninterrupted["full"]


def completed_iteration(run_dir):
    try:
        return json.loads((run_dir / "state.json").read_text())["completed_iteration"]
    except (OSError, ValueError):
        return None


def shutil_rmtree(path):
    import shutil

    shutil.rmtree(path, ignore_errors=True)
