"""Figures of a warm.json: held-out pairwise accuracy of each member, the ensemble and the weight average, and
the members' training losses.   python reports/warm/plot.py WARM.json OUT_DIR"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

report, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
members = report["members"]
names = [f"member {m['member']}" for m in members] + ["ensemble\n(mean of scores)", "WARM\n(mean of weights)"]
values = [m["accuracy"] for m in members] + [report["ensemble_accuracy"], report["warm_accuracy"]]
fig, ax = plt.subplots(figsize=(8.5, 3.8))
bars = ax.bar(names, values, color=["#9bb"] * len(members) + ["#c96", "#369"])
ax.bar_label(bars, fmt="%.3f")
ax.axhline(report["init_accuracy"], color="grey", ls=":", label=f"shared init {report['init_accuracy']:.3f}")
ax.set_ylim(min(values + [report["init_accuracy"]]) - 0.05, 1.0)
ax.set_ylabel(f"pairwise accuracy\n({report['eval_pairs']} held-out pairs)")
ax.legend(loc="lower right")
fig.tight_layout()
fig.savefig(out / "accuracy.png", dpi=120)

fig, ax = plt.subplots(figsize=(7, 3.5))
for m in members:
    ax.plot(m["losses"], label=f"member {m['member']} (seed {m['seed']})", alpha=0.8)
ax.set_xlabel("step")
ax.set_ylabel("Bradley-Terry loss")
ax.legend()
fig.tight_layout()
fig.savefig(out / "losses.png", dpi=120)
print(f"figures in {out}")
