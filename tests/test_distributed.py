"""Two processes (torchrun, gloo on CPUs: accelerate's MULTI_CPU) run the same RAFT loop as one: each samples
its shards of the prompts, the samples are gathered before ranking, every process selects the same set,
fine-tuning is data-parallel and only the main process writes the run directory. Same seed and global batch:
the same selected samples, and the same weights up to float rounding (the processes sum gradients in another
order)."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def raft_run(args: list[str], processes: int) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "raft"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "raft"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([*launcher, "run", *args], capture_output=True, text=True, env=env, timeout=600)
    # Known flake (about 1 launch in 20 on a loaded machine, issue 13's note): a worker aborts in C++ teardown
    # ("terminate called without an active exception") after the run finished and the main process committed
    # everything. Accepted only then: the caller still compares every file the run wrote.
    torn_down = (processes > 1 and "terminate called without an active exception" in result.stderr
                 and "held-out reward:" in result.stdout)
    assert result.returncode == 0 or torn_down, result.stdout[-2000:] + result.stderr[-6000:]
    return result


def records(run_dir, iteration: int, name: str) -> list[dict]:
    path = run_dir / "iterations" / f"iter-{iteration:04d}" / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


VARIANTS = {
    # RAFT with its defences (KL-regularized ranking, diversity, replay) and gradient accumulation
    "sft": (["finetune.gradient_accumulation_steps=2"], "model.safetensors",
            ("train/loss", "train/replay_loss")),
    # PPO under LoRA: value head in the data-parallel wrapper, the adapter-disabled policy as the KL reference
    "ppo+lora": (["finetune.objective=ppo", "finetune.lora.enabled=true", "finetune.lora.r=4", "ppo.learning_rate=1e-3",
                  "ppo.mini_batch_size=4", "ppo.epochs=2"], "adapter_model.safetensors",
                 ("train/loss", "ppo/policy_loss", "ppo/value_loss", "ppo/kl")),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_processes_select_the_same_samples_and_train_the_same_weights(tiny_model_dir, prompt_file,
                                                                           reference_file, tmp_path, variant):
    extra, weights_file, train_keys = VARIANTS[variant]
    settings = ["iterations=2", "prompts_per_iteration=4", "prompts_per_shard=2", "samples_per_prompt=3",
                "finetune.batch_size=4", "eval.best_of_n=2", *extra]
    one, two = tmp_path / "one", tmp_path / "two"
    raft_run([*tiny_overrides(tiny_model_dir, prompt_file, one, reference_file), *settings], processes=1)
    # two processes: the first iteration, then a resumed run for the second
    first = raft_run([*tiny_overrides(tiny_model_dir, prompt_file, two, reference_file), *settings,
                      "iterations=1"], processes=2)
    assert "2 processes (MULTI_CPU)" in first.stdout
    raft_run(["--resume", str(two), "--trust-run-code", "iterations=2"], processes=2)

    for iteration in (1, 2):
        for name in ("samples", "selected"):
            a, b = records(one, iteration, name), records(two, iteration, name)
            assert [(r["prompt"], r["output"]) for r in a] == [(r["prompt"], r["output"]) for r in b], (iteration, name)
            assert [r["reward"] for r in a] == pytest.approx([r["reward"] for r in b])
            if "kl" in a[0]:
                assert [r["kl"] for r in a] == pytest.approx([r["kl"] for r in b], abs=1e-4)
        held_out = (records(one, iteration, "eval_samples"), records(two, iteration, "eval_samples"))
        assert [r["output"] for r in held_out[0]] == [r["output"] for r in held_out[1]]

    rows = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, two)]
    assert [r["iteration"] for r in rows[1]] == [0, 1, 2]  # written once, by the main process
    assert rows[0][0]["eval/best_of_n_reward"] == pytest.approx(rows[1][0]["eval/best_of_n_reward"])
    for key in (*train_keys, "eval/reward_mean", "eval/perplexity", "eval/kl_to_start"):
        for iteration in (1, 2):
            assert rows[0][iteration][key] == pytest.approx(rows[1][iteration][key], rel=1e-4, abs=1e-6), key

    weights = [load_file(run / "checkpoints" / "iter-0002" / weights_file) for run in (one, two)]
    assert weights[0].keys() == weights[1].keys()
    if variant == "sft":
        start = load_file(tiny_model_dir / "model.safetensors")
        moved = max((weights[0][k] - start[k]).abs().max().item() for k in start)
    else:  # LoRA's B matrices start at zero
        moved = max(w.abs().max().item() for k, w in weights[0].items() if "lora_B" in k)
    difference = max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0])
    print(f"{variant}: largest weight change {moved:.3e}; largest 1-vs-2-process difference {difference:.3e}")
    assert moved > 1e-3  # training moved the weights...
    assert difference < 1e-5  # ...the same way on 1 and 2 processes


def test_data_parallel_gradient_is_the_one_process_gradient(tmp_path):
    """3 processes, 2 rows: one process has none and joins the gradient sync with weight 0. The summed gradient
    is the full batch's (Adam would hide a wrong scale in the weights; the gradient does not)."""
    worker = os.path.join(os.path.dirname(__file__), "trainer_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(worker)), os.environ.get("PYTHONPATH", "")])}
    outputs = {}
    for processes in (1, 3):
        out = tmp_path / f"{processes}.pt"
        launcher = [sys.executable] if processes == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
        result = subprocess.run([*launcher, worker, "2", str(out)], capture_output=True, text=True, env=env,
                                timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
        outputs[processes] = torch.load(out, weights_only=True)
    assert (outputs[3]["processes"], outputs[3]["type"]) == (3, "MULTI_CPU")
    for one, three in zip(outputs[1]["grads"], outputs[3]["grads"]):
        torch.testing.assert_close(three, one, rtol=1e-6, atol=1e-7)
    assert outputs[3]["loss"] == pytest.approx(outputs[1]["loss"], rel=1e-6)
