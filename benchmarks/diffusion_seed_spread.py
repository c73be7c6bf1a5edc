"""Is a diffusion run's held-out gain larger than chance? Prints the spread of the starting policy's held-out reward
across evaluation seeds, and the gain of the run's last checkpoint on each of those seeds.

    .venv/bin/python benchmarks/diffusion_seed_spread.py runs/diffusion-20261121-181500 [--seeds 5]

The run's held-out reward uses one evaluation seed (eval.seed) for every iteration. Redrawing the starting
policy's held-out images with other seeds shows how much that number moves by chance alone (the spread); the
gain should be well above it. A lucky or unlucky draw at eval.seed could make the run's own before/after
figures look better or worse than they are, so the last checkpoint is evaluated on the same other seeds too:
the gain on seeds the run never reported is the figure to trust. Uses the run's own config (model, prompts,
rankers, sampling settings).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--seeds", type=int, default=5, help="evaluation seeds besides the run's own")
    parser.add_argument("--start-means", type=float, nargs="+", default=None,
                        help="the starting policy's held-out means at those seeds, from an earlier call on a run with "
                             "the same model, prompts and eval settings (its start_seed_means): skips redrawing them")
    args = parser.parse_args(argv)

    import yaml

    import raft
    from raft.loop import evaluate
    from raft.modalities import get_modality
    from raft.rundir import RunDirectory

    run_dir = Path(args.run_dir)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    config = raft.load_config(saved["modality"], run_dir / "config.yaml")
    seeds = list(range(config.eval.seed + 1, config.eval.seed + 1 + args.seeds))
    checkpoint = RunDirectory(run_dir).latest_checkpoint()
    means = {}
    if args.start_means is not None:
        if len(args.start_means) != len(seeds):
            parser.error(f"--start-means: {len(args.start_means)} values for {len(seeds)} seeds")
        means["start"] = list(args.start_means)
    for name, source in [("start", None)] + ([("end", checkpoint)] if checkpoint else []):
        if name in means:
            continue
        parts = get_modality(config.modality).build(config, checkpoint=source)
        means[name] = []
        for seed in seeds:
            parts.eval_seed = seed
            metrics, _ = evaluate(parts)
            means[name].append(metrics["eval/reward_mean"])
            print(f"{name} policy, eval seed {seed}: held-out reward {metrics['eval/reward_mean']:.4f}", flush=True)
        del parts
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    start = means["start"]
    spread = statistics.stdev(start) if len(start) > 1 else float("nan")
    gain = last["eval/reward_mean"] - first["eval/reward_mean"]
    report = {
        "start_seed_means": [round(m, 4) for m in start],
        "start_seed_spread_std": round(spread, 4),
        "start_seed_range": round(max(start) - min(start), 4),
        "run_start": round(first["eval/reward_mean"], 4),
        "run_end": round(last["eval/reward_mean"], 4),
        "run_gain": round(gain, 4),
        "gain_over_spread": round(gain / spread, 2) if spread == spread and spread > 0 else None,
        "iterations": last["iteration"],
    }
    if "end" in means:
        gains = [e - s for s, e in zip(start, means["end"])]
        report.update({
            "checkpoint": str(checkpoint),
            "end_seed_means": [round(m, 4) for m in means["end"]],
            "other_seeds_gain_mean": round(statistics.mean(gains), 4),
            "other_seeds_gain_min": round(min(gains), 4),
            "other_seeds_gain_over_spread": round(statistics.mean(gains) / spread, 2) if spread == spread and spread > 0 else None,
        })
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
