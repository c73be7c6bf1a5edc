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


def plot_metrics(rows: list[dict], path: Path) -> None:
    """One small panel per metric against iteration; timings are left to metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in rows[0] if k != "iteration" and not k.startswith("time/")] if rows else []
    names = [k for k in names if any(isinstance(r.get(k), (int, float)) for r in rows)]
    if not names:
        return
    columns = min(4, len(names))
    lines = math.ceil(len(names) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(3.6 * columns, 2.6 * lines), squeeze=False)
    for axis, name in zip(axes.flat, names):
        points = [(r["iteration"], r[name]) for r in rows if isinstance(r.get(name), (int, float))]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("iteration", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(names):]:
        axis.axis("off")
    figure.tight_layout()
    from raft.rundir import replace_durably, temp_path

    tmp = temp_path(path, ".png")
    try:
        figure.savefig(tmp, dpi=90)
        replace_durably(tmp, path)
    finally:
        plt.close(figure)
        tmp.unlink(missing_ok=True)
