"""Do a shapes-world run's held-out images show what their captions say? Checks every held-out image of every
iteration by rule (raft.modalities.diffusion.world.check, GenEval's idea for this world: find the objects by colour,
their shapes by outline, their relation by position) and prints, per iteration, the CLIP reward the run measured
(its reward, and the CLIP score where the CLIP judge is one of several rankers) beside the share of images that
pass each check.

    .venv/bin/python benchmarks/diffusion_composition.py RUN_DIR [RUN_DIR ...]

The CLIP judge is a learned reward, and a learned reward can be satisfied in ways the captions do not mean
(frames filled with a prompt's colours scored higher than clean shapes in reports/diffusion-transfer). The rules
cannot: an image passes `exact` only with exactly the caption's objects, each of the right colour and shape, in the
right relation. Every true image of the world passes (tests/test_diffusion_world.py). Columns: `colours`: each
named colour is some object's; `objects`: each named object is there (colour and shape); `exact`: those objects,
nothing else, in the caption's relation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def check_iteration(folder: Path) -> dict[str, float] | None:
    from PIL import Image

    from raft.modalities.diffusion import world

    path = folder / "eval_samples.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    totals = {"reward": 0.0, "clip": 0.0, "colours": 0, "objects": 0, "exact": 0}
    for record in records:
        scene = world.parse(record["prompt"])
        result = world.check(Image.open(folder / record["output"]), record["prompt"])
        named = {scene.first.color} | ({scene.second.color} if scene.second else set())
        totals["reward"] += record["reward"]
        # the CLIP ranker's part of an ensemble's reward (the default's one ranker: the reward itself)
        totals["clip"] += (record.get("rewards") or {}).get("clip_score", record["reward"])
        totals["colours"] += named <= {f.color for f in result.found}
        totals["objects"] += result.objects
        totals["exact"] += result.exact
    return {key: value / len(records) for key, value in totals.items()} | {"images": len(records)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+")
    args = parser.parse_args(argv)
    for run_dir in map(Path, args.run_dirs):
        folders = sorted((run_dir / "iterations").glob("iter-*"))
        if not folders:
            print(f"{run_dir}: no iterations/iter-* folders: not a raft run directory", file=sys.stderr)
            return 1
        print(f"{run_dir}\n  iteration  images   reward  CLIP score  colours  objects  exact")
        for folder in folders:
            row = check_iteration(folder)
            if row is not None:
                print(f"  {int(folder.name.split('-')[1]):9d}  {row['images']:6d}  {row['reward']:7.3f}  {row['clip']:10.2f}  "
                      f"{row['colours']:7.1%}  {row['objects']:7.1%}  {row['exact']:5.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
