"""`raft compare`: RAFT with and without its collapse defences, RRHF, PPO and best-of-K on the same model,
prompts, reward and budget, over one or more seeds, and a report.

Every run (one method with one seed) is its own subprocess, one after another (`raft best-of-k`, `raft run`,
`raft run` with the defences off, `raft run` with finetune.objective=rrhf, `raft ppo`), from one shared
config, so each one's wall-clock and peak memory (its peak resident set size) are measured alone and in the
same session. A policy's KL to the starting model is its last metrics row's eval/kl_to_start, which every
run's loop measures the same way. <out>/report.md (mean ± std over seeds, then each run), results.json,
reward_vs_wallclock.png, reward_vs_samples.png and reward_vs_kl.png are written.

    raft compare --budget-samples 384 --seeds 0,1,2 --out reports/my-comparison data.eval_size=32
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import yaml

from raft.config import GUARD_BOUNDS, _merge, to_dict
from raft.errors import RaftError
from raft.loop import OPENING_WORDS
from raft.metrics import train_seconds
from raft.rundir import RunDirectory, iteration_name

METHODS = ("best_of_k", "raft", "raft_undefended", "rrhf", "ppo")
LABELS = {"start": "starting policy", "best_of_k": "best-of-K (inference)", "raft": "RAFT (defended)",
          "raft_undefended": "RAFT (undefended)", "rrhf": "RRHF", "ppo": "PPO"}
COMMANDS = {"best_of_k": "best-of-k", "raft": "run", "raft_undefended": "run", "rrhf": "run", "ppo": "ppo"}
COLOURS = {"best_of_k": "tab:gray", "raft": "tab:blue", "raft_undefended": "tab:orange", "rrhf": "tab:green",
           "ppo": "tab:red"}

# What turns every collapse defence off. Only the defended RAFT keeps the shared config's; everything else,
# the sampling temperature included, stays the same for all methods.
DEFENCES_OFF = {
    "kl": {"beta": 0.0, "adaptive": False},
    "selection": {"diversity": {"max_similarity": None, "max_opening_share": None}},
    "finetune": {"replay": {"share": 0.0}},
    "guard": {name: None for name in GUARD_BOUNDS},
}


def compare(config, methods: list[str], out: Path, command_line: str, budget_samples: int | None = None,
            budget_seconds: float | None = None, seeds: list[int] | None = None) -> Path:
    """Run `methods` once per seed (default: the config's) with the shared `config` (a TextPPOConfig) under
    one budget; returns the report's path."""
    seeds = [config.seed] if seeds is None else seeds
    check_choices(methods, seeds)
    runs = Path(out) / "runs"
    if runs.exists() and any(runs.iterdir()):
        raise RaftError(f"compare: '{runs}' already holds runs; choose another --out or remove it")
    runs.mkdir(parents=True, exist_ok=True)
    shared = with_budget(to_dict(config), budget_samples, budget_seconds)

    # seed by seed, every method within a seed: a change in the machine's load over the session spreads over
    # all methods instead of falling on the last one
    results = {}
    for seed in seeds:
        for method in methods:
            results[run_name(method, seed)] = run_method(shared, method, seed, runs)

    (Path(out) / "results.json").write_text(json.dumps(
        {"command": command_line, "budget_samples": budget_samples, "budget_seconds": budget_seconds,
         "seeds": seeds, "config": shared, "results": results}, indent=1, default=float) + "\n")
    plot_reward(results, "samples", Path(out) / "reward_vs_samples.png")
    plot_reward(results, "seconds", Path(out) / "reward_vs_wallclock.png")
    plot_frontier(results, Path(out) / "reward_vs_kl.png")
    report = Path(out) / "report.md"
    report.write_text(markdown_report(results, shared, command_line, budget_samples, budget_seconds, seeds))
    print(f"compare: report written to {report}", flush=True)
    return report


def check_choices(methods: list[str], seeds: list[int]) -> None:
    """Known methods and seeds, each once: a repeat would reuse a run directory."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise RaftError(f"compare: unknown method '{unknown[0] if unknown else ''}' (methods: {', '.join(METHODS)})")
    for kind, chosen in (("method", methods), ("seed", seeds)):
        twice = [c for c, n in Counter(chosen).items() if n > 1]
        if twice:
            raise RaftError(f"compare: {kind} '{twice[0]}' is listed twice")
    if not seeds:
        raise RaftError("compare: --seeds names no seed")


def parse_seeds(raw: str | None) -> list[int] | None:
    """--seeds 0,1,2 as a list; None when not given (the config's seed)."""
    if raw is None:
        return None
    try:
        seeds = [int(part) for part in raw.split(",")]
    except ValueError:
        raise RaftError(f"compare: --seeds must be comma-separated integers, got '{raw}'") from None
    if any(seed < 0 for seed in seeds):  # numpy's seed sequences take no negative entropy
        raise RaftError(f"compare: --seeds must be >= 0, got '{raw}'")
    return seeds


def run_name(method: str, seed: int) -> str:
    return f"{method}-seed{seed}"


def run_method(shared: dict, method: str, seed: int, runs: Path) -> dict:
    """One measured run: runs/<method>-seed<N>/ with its config file and log beside it."""
    name = run_name(method, seed)
    config_path = runs / f"{name}.yaml"
    data = method_settings(shared, method, runs / name, seed)
    config_path.write_text(yaml.safe_dump(data, sort_keys=False, width=100))
    command = [sys.executable, "-m", "raft", COMMANDS[method], "--config", str(config_path)]
    print(f"compare: {LABELS[method]}, seed {seed}: raft {COMMANDS[method]} --config {config_path} "
          f"(log: {runs / name}.log)", flush=True)
    result = {"method": method, "seed": seed, **run_measured(command, runs / f"{name}.log"),
              "rows": RunDirectory(runs / name).metrics()}
    if method == "best_of_k" and result["rows"]:
        # best-of-K's own row has no opening share; measured here the loop's way, from the chosen answers
        result["top_opening_share"] = top_opening_share(runs / name, OPENING_WORDS)
    status = "done" if result["returncode"] == 0 else f"FAILED (exit {result['returncode']})"
    print(f"compare: {LABELS[method]}, seed {seed} {status} in {result['wall_seconds']:.0f} s, peak RSS "
          f"{result['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    return result


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


def method_settings(shared: dict, method: str, run_dir: Path, seed: int | None = None) -> dict:
    """The config file of one run: the shared settings, plus what makes the method itself.

    Only `raft` keeps the shared collapse defences. `raft_undefended` and `rrhf` (as published) run without
    them; PPO (its own KL penalty) and best-of-K (no training) use none of them, and with them off their
    settings files say what was in effect and no guard bound can stop them early."""
    data = copy.deepcopy(shared)
    data["run_dir"] = str(run_dir)
    if seed is not None:
        data["seed"] = seed
    ppo = data.pop("ppo")
    if method != "raft":
        data = _merge(data, DEFENCES_OFF)
    if method == "ppo":
        data["ppo"] = ppo
    if method == "rrhf":  # every scored candidate goes to the ranking loss
        data["finetune"]["objective"] = "rrhf"
        data["selection"]["strategy"] = "all"
        data["selection"]["replay_iterations"] = 0  # it ranks one iteration's candidates of each prompt
    else:  # PPO and best-of-K ignore it, but a shared rrhf would fail their validation with local selection
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


def top_opening_share(run_dir: Path, opening_words: int) -> float:
    """Share of a run's iteration-0 held-out answers that open with its most common first words."""
    from raft.modalities.text.diversity import opening_of

    path = Path(run_dir) / "iterations" / iteration_name(0) / "eval_samples.jsonl"
    openings = Counter(opening_of(json.loads(line)["output"], opening_words)
                       for line in path.read_text().splitlines() if line.strip())
    return openings.most_common(1)[0][1] / sum(openings.values()) if openings else math.nan


# ----------------------------------------------------------------------------------------------
# per-run numbers and their spread over seeds

COLUMNS = ("reward", "delta", "distinct_2", "distinct_2_ratio", "top_opening_share", "perplexity",
           "perplexity_change", "kl", "iterations", "train_seconds", "peak_rss_gib")


def run_summary(result: dict, start: dict | None) -> dict[str, float]:
    """One finished run's numbers (COLUMNS): its last metrics row, against the starting policy's row `start`
    (row 0 of a trained run with the same seed; best-of-K has none of its own). NaN where a metric is missing."""
    rows = result["rows"]
    last = rows[-1]
    best_of_k = result["method"] == "best_of_k"
    reward, distinct_2, perplexity = (value(last, f"eval/{k}") for k in ("reward_mean", "distinct_2", "perplexity"))
    return {
        "reward": reward,
        "delta": reward - value(start, "eval/reward_mean"),
        "distinct_2": distinct_2,
        "distinct_2_ratio": ratio(distinct_2, value(start, "eval/distinct_2")),
        # best-of-K's is measured by compare itself (run_method): its row has none
        "top_opening_share": result.get("top_opening_share", value(last, "eval/top_opening_share")),
        "perplexity": perplexity,
        "perplexity_change": 100 * (ratio(perplexity, value(start, "eval/perplexity")) - 1),
        "kl": value(last, "best_of_k/kl_bound" if best_of_k else "eval/kl_to_start"),
        "iterations": last["iteration"],
        "train_seconds": train_seconds(rows),
        "peak_rss_gib": result["peak_rss_bytes"] / 2**30,
    }


def value(row: dict | None, key: str) -> float:
    number = (row or {}).get(key)
    return float(number) if isinstance(number, (int, float)) and not isinstance(number, bool) else math.nan


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator and math.isfinite(denominator) else math.nan


def seed_statistics(summaries: list[dict[str, float]]) -> dict[str, tuple[float, float | None]]:
    """Per column of the runs' summaries (one per seed): the mean and the sample standard deviation (n - 1),
    None when only one seed has the value. Missing values (NaN) are left out; a column left with none is NaN."""
    spread = {}
    for column in summaries[0] if summaries else ():
        values = [s[column] for s in summaries if math.isfinite(s[column])]
        spread[column] = (statistics.fmean(values) if values else math.nan,
                          statistics.stdev(values) if len(values) > 1 else None)
    return spread


def starting_rows(results: dict) -> dict[int, dict]:
    """Per seed, the starting policy's metrics row: row 0 of that seed's first trained run that has one."""
    starts = {}
    for result in results.values():
        if result["method"] != "best_of_k" and result["rows"]:
            starts.setdefault(result["seed"], result["rows"][0])
    return starts


def finished(result: dict) -> bool:
    return result["returncode"] == 0 and bool(result["rows"])


# ----------------------------------------------------------------------------------------------
# plots


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


def frontier(rows: list[dict]) -> tuple[list[float], list[float]]:
    """(KL to the starting model, held-out reward) per evaluated iteration of a trained run; the starting
    policy (iteration 0) is at KL 0 even where its row does not say so."""
    kls, rewards = [], []
    for row in rows:
        kl = row.get("eval/kl_to_start", 0.0 if row.get("iteration") == 0 else None)
        if isinstance(kl, (int, float)) and isinstance(row.get("eval/reward_mean"), (int, float)):
            kls.append(kl)
            rewards.append(row["eval/reward_mean"])
    return kls, rewards


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def label_once(method: str, labelled: set[str], text: str | None = None) -> str | None:
    """A method's legend label on its first run only (the first seed): its other seeds share the colour."""
    if method in labelled:
        return None
    labelled.add(method)
    return text or LABELS[method]


def plot_reward(results: dict, x: str, path: Path) -> None:
    """Held-out reward against generated samples or training wall-clock: one line per run."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    labelled: set[str] = set()
    for result in results.values():
        method, rows = result["method"], result["rows"]
        if not rows:
            continue
        xs, ys, errors = curve(rows, x)
        if method == "best_of_k":
            label = label_once(method, labelled, f"best-of-{rows[0]['best_of_k/k']} at inference (no training)")
            axis.axhline(ys[0], color=COLOURS[method], linestyle="--", linewidth=1, label=label)
            continue
        axis.errorbar(xs, ys, yerr=errors, color=COLOURS[method], marker="o", markersize=3, capsize=2,
                      linewidth=1, alpha=0.8, label=label_once(method, labelled))
    axis.set_xlabel("generated training samples" if x == "samples" else "training wall-clock, s (evaluation excluded)")
    axis.set_ylabel("held-out reward (mean ± s.e.)")
    finish(figure, axis, results, path)


def plot_frontier(results: dict, path: Path) -> None:
    """The reward-KL frontier: held-out reward against eval/kl_to_start, one point per iteration of each run
    (a line joins a run's iterations); best-of-K at its KL bound; the starting policy at KL 0."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    labelled: set[str] = set()
    for result in results.values():
        method, rows = result["method"], result["rows"]
        if not rows:
            continue
        if method == "best_of_k":
            label = label_once(method, labelled, f"best-of-{rows[0]['best_of_k/k']} at inference (KL bound)")
            axis.scatter([rows[0]["best_of_k/kl_bound"]], [rows[0]["eval/reward_mean"]], marker="*", s=90,
                         color=COLOURS[method], zorder=3, label=label)
            continue
        kls, rewards = frontier(rows)
        axis.plot(kls, rewards, color=COLOURS[method], marker="o", markersize=3, linewidth=1, alpha=0.8,
                  label=label_once(method, labelled))
    for start in starting_rows(results).values():
        axis.scatter([0.0], [start["eval/reward_mean"]], marker="s", s=30, color="black", zorder=4,
                     label=label_once("start", labelled))
    axis.set_xlabel("KL to the starting model, nats per response (eval/kl_to_start)")
    axis.set_ylabel("held-out reward")
    finish(figure, axis, results, path)


def finish(figure, axis, results: dict, path: Path) -> None:
    seeds = {result["seed"] for result in results.values()}
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, title="one line per seed" if len(seeds) > 1 else None, title_fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot().close(figure)


# ----------------------------------------------------------------------------------------------
# the report

HEADER = ("held-out reward | Δ vs start | distinct-2 | distinct-2 / start's | top opening share | perplexity | "
          "perplexity vs start | KL to start (nats/response) | iterations | training wall-clock (s) | peak RSS (GiB)")
DIGITS = {"reward": 3, "delta": 3, "distinct_2": 3, "distinct_2_ratio": 2, "top_opening_share": 2, "perplexity": 2,
          "perplexity_change": 1, "kl": 2, "iterations": 1, "train_seconds": 0, "peak_rss_gib": 2}


def cell(column: str, mean: float, std: float | None = None, digits: int | None = None) -> str:
    """A table cell: `mean ± std`, or the value alone (one seed); signed for changes, '–' when missing."""
    if not math.isfinite(mean):
        return "–"
    digits = DIGITS[column] if digits is None else digits
    sign = "+" if column in ("delta", "perplexity_change") else ""
    unit = " %" if column == "perplexity_change" else ""
    text = f"{mean:{sign}.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")
    return text + unit


def method_name(method: str, runs: list[dict]) -> str:
    """The method's label; best-of-K's says its K, from the runs' rows."""
    k = next((r["rows"][0].get("best_of_k/k") for r in runs if r["rows"]), None) if method == "best_of_k" else None
    return f"best-of-{k} (inference)" if k else LABELS[method]


def kl_cell(method: str, text: str) -> str:
    return f"≤ {text} (bound)" if method == "best_of_k" and text != "–" else text


def mean_table(results: dict, methods: list[str], starts: dict[int, dict]) -> list[str]:
    """Per method, mean ± std over its finished seeds; the starting policy first."""
    lines = [f"| method | seeds | {HEADER} |", "|---" * (2 + len(COLUMNS)) + "|"]
    if starts:
        start = seed_statistics([{"reward": value(r, "eval/reward_mean"), "distinct_2": value(r, "eval/distinct_2"),
                                  "top_opening_share": value(r, "eval/top_opening_share"),
                                  "perplexity": value(r, "eval/perplexity")} for r in starts.values()])
        lines.append(f"| {LABELS['start']} | {len(starts)} | {cell('reward', *start['reward'])} | | "
                     f"{cell('distinct_2', *start['distinct_2'])} | 1 | "
                     f"{cell('top_opening_share', *start['top_opening_share'])} | "
                     f"{cell('perplexity', *start['perplexity'])} | | 0 | 0 | | |")
    for method in methods:
        runs = [r for r in results.values() if r["method"] == method]
        done = [run_summary(r, starts.get(r["seed"])) for r in runs if finished(r)]
        failed = len(runs) - len(done)
        seeds = f"{len(done)}" + (f" ({failed} failed)" if failed else "")
        if not done:
            lines.append(f"| {method_name(method, runs)} | {seeds} |" + " |" * len(COLUMNS))
            continue
        spread = seed_statistics(done)
        cells = [cell(c, *spread[c]) for c in COLUMNS]
        cells[COLUMNS.index("kl")] = kl_cell(method, cells[COLUMNS.index("kl")])
        lines.append(f"| {method_name(method, runs)} | {seeds} | {' | '.join(cells)} |")
    return lines


def seed_table(results: dict, methods: list[str], starts: dict[int, dict]) -> list[str]:
    """One line per run, method by method."""
    lines = [f"| method | seed | {HEADER} | machine load (start → end) |", "|---" * (3 + len(COLUMNS)) + "|"]
    for method in methods:
        for name, result in results.items():
            if result["method"] != method:
                continue
            prefix = f"| {method_name(method, [result])} | {result['seed']} |"
            if not finished(result):
                lines.append(f"{prefix} failed (exit {result['returncode']}, see runs/{name}.log) |"
                             + " |" * len(COLUMNS))
                continue
            summary = run_summary(result, starts.get(result["seed"]))
            cells = [cell(c, summary[c], digits=0 if c == "iterations" else None) for c in COLUMNS]
            cells[COLUMNS.index("kl")] = kl_cell(method, cells[COLUMNS.index("kl")])
            load = result["load_average"]
            lines.append(f"{prefix} {' | '.join(cells)} | {load[0]:.1f} → {load[1]:.1f} |")
    return lines


def defences(shared: dict) -> str:
    """The defended RAFT's collapse-defence settings, as the report states them."""
    def show(setting) -> str:  # as in the config files
        return "null" if setting is None else str(setting).lower() if isinstance(setting, bool) else f"{setting:g}"

    kl, diversity, guard = shared["kl"], shared["selection"]["diversity"], shared["guard"]
    bounds = ", ".join(f"{name}={show(guard[name])}" for name in GUARD_BOUNDS if guard[name] is not None)
    guarded = f"{bounds} ({guard['action']})" if bounds else "off"
    return (f"kl.beta={show(kl['beta'])} (adaptive: {show(kl['adaptive'])}, target {show(kl['target'])}), "
            f"selection.diversity.max_similarity={show(diversity['max_similarity'])}, "
            f"selection.diversity.max_opening_share={show(diversity['max_opening_share'])}, "
            f"finetune.replay.share={show(shared['finetune']['replay']['share'])}, "
            f"guard: {guarded}")


def markdown_report(results: dict, shared: dict, command_line: str, budget_samples, budget_seconds,
                    seeds: list[int]) -> str:
    methods = list(dict.fromkeys(r["method"] for r in results.values()))
    starts = starting_rows(results)
    budget = []
    if budget_samples is not None:
        budget.append(f"{budget_samples} generated samples ({shared['iterations']} iterations)")
    if budget_seconds is not None:
        budget.append(f"{budget_seconds:g} s of training wall-clock (evaluation excluded; checked between iterations)")
    rankers = ", ".join(r["kind"] + (f":{r['lexicon']}" if r["kind"] == "lexicon" else "") for r in shared["rankers"])
    eval_size = shared["data"]["eval_size"]
    return "\n".join([
        "# RAFT (defended and undefended) vs RRHF vs PPO vs best-of-K",
        "",
        f"Reproduce with `{command_line}`.",
        "",
        f"- model: `{shared['model']['name_or_path']}` ({'LoRA' if shared['finetune']['lora']['enabled'] else 'full fine-tuning'}), "
        f"reward: {rankers}, prompts: `{shared['data']['prompts']}`",
        f"- per iteration: {shared['prompts_per_iteration']} prompts x {shared['samples_per_prompt']} samples "
        f"(max {shared['generation']['max_new_tokens']} new tokens, temperature {shared['generation']['temperature']}), "
        f"seeds {', '.join(map(str, seeds))}",
        f"- budget per trained method: {'; '.join(budget) or str(shared['iterations']) + ' iterations'}",
        f"- collapse defences of RAFT (defended): {defences(shared)}; RAFT (undefended), RRHF, PPO and best-of-K "
        "run with them all off",
        f"- held-out reward: {eval_size} held-out prompts x {shared['eval']['samples_per_prompt']} samples, the same "
        "held-out prompts and sampling seed for every method, seed and iteration; perplexity on held-out reference "
        "reviews",
        "- each run ran in its own process, one after another (seed by seed); wall-clock and peak RSS are that "
        f"process's; {os.cpu_count()} CPU cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"CUDA {'available' if torch.cuda.is_available() else 'not available'}; the machine load (1-minute "
        "average, per run below) says how much other work shared the cores",
        "",
        "Mean ± standard deviation over seeds (n - 1 in the denominator; the value alone for one seed), at each "
        "run's last iteration:",
        "",
        *mean_table(results, methods, starts),
        "",
        "Per seed:",
        "",
        *seed_table(results, methods, starts),
        "",
        "Δ, distinct-2 / start's and perplexity vs start compare each run with the starting policy of its own seed. "
        "Top opening share: the share of held-out replies opening with the most common "
        f"{OPENING_WORDS} words. Training wall-clock: generation, ranking, "
        "selection and the update, summed over iterations (evaluation excluded). KL to start: the last "
        "iteration's eval/kl_to_start, exact over the vocabulary at each position of the policy's held-out "
        "samples, at the sampling temperature, summed over the response. Best-of-K's KL is the analytic bound "
        "log K - (K-1)/K. Iterations fall short of the budget where a guard bound stopped a run.",
        "",
        "![held-out reward against training wall-clock](reward_vs_wallclock.png)",
        "![held-out reward against generated samples](reward_vs_samples.png)",
        "![held-out reward against KL to the starting model](reward_vs_kl.png)",
        "",
    ])
