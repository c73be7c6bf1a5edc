"""`raft compare`: RAFT, RRHF, PPO and best-of-K on the same model, prompts, reward and budget, and a report.

Every method runs as its own subprocess, one after another (`raft best-of-k`, `raft run`, `raft run` with
finetune.objective=rrhf, `raft ppo`), from one shared config, so each one's wall-clock and peak memory (its
peak resident set size) are measured alone and in the same session. Afterwards each trained
policy's KL to the starting model is measured the same way for all (see `kl_to_reference`), and
<out>/report.md, results.json, reward_vs_wallclock.png and reward_vs_samples.png are written.

    raft compare --budget-samples 384 --out reports/my-comparison data.eval_size=32
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from raft.baselines.best_of_k import kl_bound
from raft.config import to_dict
from raft.errors import RaftError
from raft.metrics import train_seconds
from raft.rundir import RunDirectory, iteration_name, to_jsonl

METHODS = ("best_of_k", "raft", "rrhf", "ppo")
LABELS = {"start": "starting policy", "best_of_k": "best-of-K (inference)", "raft": "RAFT", "rrhf": "RRHF",
          "ppo": "PPO"}
COMMANDS = {"best_of_k": "best-of-k", "raft": "run", "rrhf": "run", "ppo": "ppo"}


def compare(config, methods: list[str], out: Path, command_line: str, budget_samples: int | None = None,
            budget_seconds: float | None = None) -> Path:
    """Run `methods` with the shared `config` (a TextPPOConfig) under one budget; returns the report's path."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise RaftError(f"compare: unknown method '{unknown[0] if unknown else ''}' (methods: {', '.join(METHODS)})")
    runs = Path(out) / "runs"
    if runs.exists() and any(runs.iterdir()):
        raise RaftError(f"compare: '{runs}' already holds runs; choose another --out or remove it")
    runs.mkdir(parents=True, exist_ok=True)
    shared = with_budget(to_dict(config), budget_samples, budget_seconds)

    results = {}
    for method in methods:
        data = method_settings(shared, method, runs / method)
        config_path = runs / f"{method}.yaml"
        config_path.write_text(yaml.safe_dump(data, sort_keys=False, width=100))
        command = [sys.executable, "-m", "raft", COMMANDS[method], "--config", str(config_path)]
        print(f"compare: {LABELS[method]}: raft {COMMANDS[method]} --config {config_path} (log: {runs / method}.log)",
              flush=True)
        measured = run_measured(command, runs / f"{method}.log")
        measured["rows"] = RunDirectory(runs / method).metrics()
        results[method] = measured
        status = "done" if measured["returncode"] == 0 else f"FAILED (exit {measured['returncode']})"
        print(f"compare: {LABELS[method]} {status} in {measured['wall_seconds']:.0f} s, peak RSS "
              f"{measured['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)

    trained = [m for m in methods if m != "best_of_k" and results[m]["returncode"] == 0]
    if trained:
        print("compare: measuring each policy's KL to the starting model on its held-out samples", flush=True)
        kls = kl_to_reference(config, [runs / m for m in trained])
        for method, kl in zip(trained, kls):
            results[method]["kl_to_reference"] = kl

    (Path(out) / "results.json").write_text(json.dumps(
        {"command": command_line, "budget_samples": budget_samples, "budget_seconds": budget_seconds,
         "config": shared, "results": results}, indent=1, default=float) + "\n")
    plot_reward(results, "samples", Path(out) / "reward_vs_samples.png")
    plot_reward(results, "seconds", Path(out) / "reward_vs_wallclock.png")
    report = Path(out) / "report.md"
    report.write_text(markdown_report(results, shared, command_line, budget_samples, budget_seconds))
    print(f"compare: report written to {report}", flush=True)
    return report


def with_budget(shared: dict, budget_samples: int | None, budget_seconds: float | None) -> dict:
    """The same budget for every trained method: a number of generated samples, seconds of training, or both."""
    shared = copy.deepcopy(shared)
    per_iteration = shared["prompts_per_iteration"] * shared["samples_per_prompt"]
    if budget_samples is not None:
        if budget_samples < per_iteration:
            raise RaftError(f"compare: --budget-samples {budget_samples} is less than one iteration's samples "
                            f"(prompts_per_iteration x samples_per_prompt = {per_iteration})")
        shared["iterations"] = budget_samples // per_iteration
    if budget_seconds is not None:
        shared["max_train_seconds"] = float(budget_seconds)
        if budget_samples is None:
            shared["iterations"] = 10_000  # the clock stops it
    return shared


def method_settings(shared: dict, method: str, run_dir: Path) -> dict:
    """The config file of one method: the shared settings, plus what makes the method itself."""
    data = copy.deepcopy(shared)
    data["run_dir"] = str(run_dir)
    ppo = data.pop("ppo")
    if method == "ppo":
        data["ppo"] = ppo
    elif method == "rrhf":  # every scored candidate goes to the ranking loss
        data["finetune"]["objective"] = "rrhf"
        data["selection"]["strategy"] = "all"
    else:
        data["finetune"]["objective"] = "sft"
    return data


def run_measured(command: list[str], log: Path, poll_seconds: float = 0.2) -> dict:
    """Run `command` to completion (output to `log`); its exit code, wall-clock and peak resident memory.

    The peak is the child's own VmHWM (Linux), read while it runs: a high-water mark, so only growth in its
    last `poll_seconds` could be missed. wait4's ru_maxrss is no good here: it keeps the high-water mark of
    the memory the child started from, the parent's (torch already loaded), which exec does not reset."""
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    peak = None
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                if pid:
                    break
                peak = vm_hwm(process.pid) or peak  # the latest reading: the child's memory after exec
                time.sleep(poll_seconds)
        except KeyboardInterrupt:
            process.kill()
            raise
    process.returncode = os.waitstatus_to_exitcode(status)
    rss_unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
    return {"returncode": process.returncode, "wall_seconds": time.perf_counter() - started,
            "peak_rss_bytes": peak or usage.ru_maxrss * rss_unit,
            "load_average": [load_before, os.getloadavg()[0]]}  # other work on the machine slows a method down


def vm_hwm(pid: int) -> int | None:
    """Peak resident set size of a running process in bytes (Linux /proc), or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@torch.no_grad()
def kl_to_reference(config, run_dirs: list[Path], batch_size: int = 8) -> list[float]:
    """Per run: KL(policy || starting model) per response, on the final policy's own held-out samples.

    Exact over the vocabulary at each response position, summed along the sampled response and averaged over
    responses (an unbiased, low-variance estimate of the sequence KL), with both models' logits divided by
    the sampling temperature, the distribution the responses were drawn from."""
    from raft.modalities.text.config import LoraConfig
    from raft.modalities.text.model import load_policy
    from raft.modalities.text.sft import IGNORE, build_example, collate

    temperature = config.generation.temperature or 1.0
    reference = load_policy(config.model, LoraConfig(), None).model
    kls = []
    for path in run_dirs:
        run = RunDirectory(path)
        policy = load_policy(config.model, config.finetune.lora, run.latest_checkpoint())
        folder = path / "iterations" / iteration_name(run.completed_iteration)
        samples = [json.loads(line) for line in (folder / "eval_samples.jsonl").read_text().splitlines()]
        examples = [build_example(policy.encode_prompt(s["prompt"]), s["token_ids"], config.finetune.max_seq_length)
                    for s in samples]
        total = 0.0
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], policy.tokenizer.pad_token_id, policy.device)
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            mine = torch.log_softmax(policy.model(**inputs).logits[:, :-1].float() / temperature, -1)
            theirs = torch.log_softmax(reference(**inputs).logits[:, :-1].float() / temperature, -1)
            per_token = (mine.exp() * (mine - theirs)).sum(-1)
            total += (per_token * (batch["labels"][:, 1:] != IGNORE)).sum().item()
        kls.append(total / max(1, len(examples)))
        del policy
    return kls


# ----------------------------------------------------------------------------------------------
# the report


def curve(rows: list[dict], x: str) -> tuple[list[float], list[float], list[float]]:
    """(x, held-out reward, its standard error) per completed iteration; x is cumulative samples or seconds."""
    xs, ys, errors = [], [], []
    for i, row in enumerate(rows):
        if not isinstance(row.get("eval/reward_mean"), (int, float)):
            continue
        so_far = rows[: i + 1]
        xs.append(sum(r.get("samples", 0) for r in so_far) if x == "samples" else train_seconds(so_far))
        ys.append(row["eval/reward_mean"])
        errors.append(row.get("eval/reward_sem") or 0.0)
    return xs, ys, errors


def plot_reward(results: dict, x: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for method, result in results.items():
        if not result["rows"]:
            continue
        xs, ys, errors = curve(result["rows"], x)
        if method == "best_of_k":
            axis.axhline(ys[0], color="gray", linestyle="--", label=f"best-of-{result['rows'][0]['best_of_k/k']} "
                         "at inference (no training)")
            continue
        axis.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=LABELS[method])
    axis.set_xlabel("generated training samples" if x == "samples" else "training wall-clock, s (evaluation excluded)")
    axis.set_ylabel("held-out reward (mean ± s.e.)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def markdown_report(results: dict, shared: dict, command_line: str, budget_samples, budget_seconds) -> str:
    def number(value, digits=3):
        return f"{value:.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else "–"

    start = next((r["rows"][0] for m, r in results.items() if m != "best_of_k" and r["rows"]), None)
    lines = [
        "| method | iterations | training samples | held-out reward | Δ vs start | perplexity | distinct-1 | "
        "distinct-2 | KL to start (nats/response) | training wall-clock (s) | process wall-clock (s) | peak RSS (GiB) | "
        "machine load (start → end) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if start is not None:
        lines.append(f"| {LABELS['start']} | 0 | 0 | {number(start['eval/reward_mean'])} ± "
                     f"{number(start.get('eval/reward_sem'))} | | {number(start.get('eval/perplexity'), 2)} | "
                     f"{number(start.get('eval/distinct_1'))} | {number(start.get('eval/distinct_2'))} | 0 | | | | |")
    for method, result in results.items():
        rows = result["rows"]
        if result["returncode"] != 0 or not rows:
            lines.append(f"| {LABELS[method]} | failed (exit {result['returncode']}, see runs/{method}.log) |"
                         + " |" * 11)
            continue
        last = rows[-1]
        if method == "best_of_k":
            kl = f"≤ {number(last['best_of_k/kl_bound'], 2)} (bound)"
            name = f"best-of-{last['best_of_k/k']} (inference)"
        else:
            kl, name = number(result.get("kl_to_reference"), 2), LABELS[method]
        delta = last["eval/reward_mean"] - start["eval/reward_mean"] if start else math.nan
        lines.append(
            f"| {name} | {last['iteration']} | {sum(r.get('samples', 0) for r in rows)} | "
            f"{number(last['eval/reward_mean'])} ± {number(last.get('eval/reward_sem'))} | {delta:+.3f} | "
            f"{number(last.get('eval/perplexity'), 2)} | {number(last.get('eval/distinct_1'))} | "
            f"{number(last.get('eval/distinct_2'))} | {kl} | {number(train_seconds(rows), 0)} | "
            f"{number(result['wall_seconds'], 0)} | {number(result['peak_rss_bytes'] / 2**30, 2)} | "
            f"{result['load_average'][0]:.1f} → {result['load_average'][1]:.1f} |")

    budget = []
    if budget_samples is not None:
        budget.append(f"{budget_samples} generated samples ({shared['iterations']} iterations)")
    if budget_seconds is not None:
        budget.append(f"{budget_seconds:g} s of training wall-clock (evaluation excluded; checked between iterations)")
    rankers = ", ".join(r["kind"] + (f":{r['lexicon']}" if r["kind"] == "lexicon" else "") for r in shared["rankers"])
    eval_size = shared["data"]["eval_size"]
    return "\n".join([
        "# RAFT vs RRHF vs PPO vs best-of-K",
        "",
        f"Reproduce with `{command_line}`.",
        "",
        f"- model: `{shared['model']['name_or_path']}` ({'LoRA' if shared['finetune']['lora']['enabled'] else 'full fine-tuning'}), "
        f"reward: {rankers}, prompts: `{shared['data']['prompts']}`",
        f"- per iteration: {shared['prompts_per_iteration']} prompts x {shared['samples_per_prompt']} samples "
        f"(max {shared['generation']['max_new_tokens']} new tokens, temperature {shared['generation']['temperature']}), "
        f"seed {shared['seed']}",
        f"- budget per trained method: {'; '.join(budget) or str(shared['iterations']) + ' iterations'}",
        f"- held-out reward: {eval_size} held-out prompts x {shared['eval']['samples_per_prompt']} samples, the same "
        "sampling seed for every method and iteration; perplexity on held-out reference reviews",
        "- each method ran in its own process, one after another; wall-clock and peak RSS are that process's; "
        f"{os.cpu_count()} CPU cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"CUDA {'available' if torch.cuda.is_available() else 'not available'}; the machine load (1-minute "
        "average) says how much other work shared the cores",
        "",
        *lines,
        "",
        "Training wall-clock: generation, ranking, selection and the update, summed over iterations (evaluation "
        "excluded). Process wall-clock: everything, model loading and every evaluation included. KL: exact over "
        "the vocabulary at each position of the final policy's held-out samples, at the sampling temperature, "
        "summed over the response. Best-of-K's KL is the analytic bound log K - (K-1)/K.",
        "",
        "![held-out reward against training wall-clock](reward_vs_wallclock.png)",
        "![held-out reward against generated samples](reward_vs_samples.png)",
        "",
    ])
