"""Where a run's iterations spent their time: generate / rank / select / fine-tune / evaluate / bookkeeping.

    .venv/bin/python benchmarks/iteration_split.py RUN_DIR

The stages are the `time/*` entries raft writes in metrics.jsonl. An iteration's wall-clock time is the gap
between its iteration folder and the previous one (each folder is written when its iteration commits), so it
also holds what no stage times: writing samples and the checkpoint, the plot, the console line, the trackers.
That remainder is the bookkeeping column. Read it on the run directory as written (a copy resets the folders'
times) and on a run that was not resumed (a resume's gap includes the restart). Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STAGES = ("generate", "rank", "select", "finetune", "evaluate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    rows = {row["iteration"]: row for row in map(json.loads, (args.run_dir / "metrics.jsonl").read_text().splitlines())}
    folders = {i: args.run_dir / "iterations" / f"iter-{i:04d}" for i in rows}
    if (args.run_dir / "resumes.jsonl").exists():
        print("note: this run was resumed; the iteration after each resume includes the restart")

    print(f"iteration 0: evaluation of the starting policy {rows[0].get('time/evaluate', float('nan')):.1f} s")
    header = ["iteration", *STAGES, "bookkeeping", "wall"]
    print(" | ".join(f"{h:>11}" for h in header))
    totals = dict.fromkeys([*STAGES, "bookkeeping", "wall"], 0.0)
    for i in sorted(rows):
        if i == 0 or i - 1 not in rows:
            continue
        wall = folders[i].stat().st_mtime - folders[i - 1].stat().st_mtime
        stages = {s: rows[i].get(f"time/{s}", 0.0) for s in STAGES}
        figures = {**stages, "bookkeeping": wall - sum(stages.values()), "wall": wall}
        for key, value in figures.items():
            totals[key] += value
        print(" | ".join([f"{i:>11}", *(f"{figures[k]:>11.1f}" for k in header[1:])]))
    if totals["wall"] <= 0:
        return
    print(" | ".join([f"{'total':>11}", *(f"{totals[k]:>11.1f}" for k in header[1:])]))
    print(" | ".join([f"{'share':>11}", *(f"{100 * totals[k] / totals['wall']:>10.1f}%" for k in header[1:])]))


if __name__ == "__main__":
    main()
