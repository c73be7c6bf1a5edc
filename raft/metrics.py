"""Metric helpers shared by modalities, and the metrics.png plot."""

from __future__ import annotations

import math
from pathlib import Path


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def standard_error(values) -> float:
    values = list(values)
    if len(values) < 2:
        return math.nan
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values))


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n: unique n-grams / all n-grams, over all texts together (whitespace tokens)."""
    total, unique = 0, set()
    for text in texts:
        words = text.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def best_of_k_kl_bound(k: int) -> float:
    """Upper bound on KL(best-of-K || policy) for one response: log K - (K - 1) / K."""
    return math.log(k) - (k - 1) / k


def train_seconds(rows: list[dict]) -> float:
    """Wall-clock spent on training in these metrics rows: every timed stage but the evaluation."""
    return sum(v for row in rows for k, v in row.items()
               if k.startswith("time/") and k != "time/evaluate" and isinstance(v, (int, float)))


BAR = "eval/best_of_n_reward"  # drawn as a line on the held-out reward's panel, not as a panel of one point


def plotted_metrics(rows: list[dict]) -> list[str]:
    """The metrics metrics.png shows, in order of first appearance (iteration 0's row holds only the evaluation's;
    the training metrics start at iteration 1): every numeric one but the timings, the best-of-n figures (the bar
    is a line on eval/reward_mean) and, once there are two rows, those that never changed (samples per iteration,
    a fixed kl/beta: metrics.jsonl has them; a flat panel says nothing and costs drawing time)."""
    values: dict[str, list] = {}
    for row in rows:
        for key, value in row.items():
            if key != "iteration" and not key.startswith(("time/", "eval/best_of_n")) and isinstance(value, (int, float)):
                values.setdefault(key, []).append(value)
    return [k for k, v in values.items() if len(rows) < 2 or len(v) < 2 or len(set(v)) > 1]


def plot_metrics(rows: list[dict], path: Path) -> None:
    """One small panel per metric against iteration; timings are left to metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = plotted_metrics(rows)
    if not names:
        return
    columns = min(5, len(names))
    lines = math.ceil(len(names) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(3.6 * columns, 2.6 * lines), squeeze=False)
    bar = next((r[BAR] for r in rows if isinstance(r.get(BAR), (int, float))), None)
    for axis, name in zip(axes.flat, names):
        points = [(r["iteration"], r[name]) for r in rows if isinstance(r.get(name), (int, float))]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        if name == "eval/reward_mean" and bar is not None:
            axis.axhline(bar, linestyle="--", color="grey", label="best-of-n at the start")
            axis.legend(fontsize=7)
        axis.set_title(name, fontsize=9)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(names):]:
        axis.axis("off")
    # fixed margins: tight_layout measured 0.4 s of a 1.5 s plot of 25 panels, at every iteration
    figure.subplots_adjust(left=0.04, right=0.99, bottom=0.3 / lines, top=1 - 0.25 / lines, hspace=0.45, wspace=0.3)
    from raft.rundir import replace_durably, temp_path

    tmp = temp_path(path, ".png")
    try:
        figure.savefig(tmp, dpi=90)
        replace_durably(tmp, path)
    finally:
        plt.close(figure)
        tmp.unlink(missing_ok=True)
