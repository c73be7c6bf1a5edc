"""Peak resident memory of a raft command, stage by stage: which stage of which iteration holds the memory.

    .venv/bin/python benchmarks/stage_memory.py run --config configs/text-imdb-lora.yaml iterations=3
    .venv/bin/python benchmarks/stage_memory.py ppo --config configs/text-imdb-lora.yaml iterations=3

Runs the `raft` command given (the same arguments) in this process and reads its resident set size every 20 ms,
each reading charged to the stage running then (`it3:rank`, `it2:evaluate`; `load` before the first stage).
The loop's held-out evaluations run inside their iteration's bookkeeping, so they get their own label
(`it2:held-out evaluation`; `it0:...` for the starting policy's), and what follows them another. A stage's peak includes what earlier stages left
allocated, as any process's resident memory does; with glibc's default malloc (`RAFT_MALLOC=system`, as `raft
compare` measured its round 2) freed blocks are returned sooner than with raft's setting. A 20 ms sampler can miss
a shorter spike; the last line gives the kernel's high-water mark, which cannot. Prints figures, asserts nothing.
"""

from __future__ import annotations

import sys
import threading
import time


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def high_water_mark_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def main(argv: list[str]) -> None:
    import raft.loop as loop
    from raft.cli import main as raft_main

    label = ["load"]
    peaks: dict[str, int] = {}

    start_stage = loop.Stages.__call__

    def stage_started(stages, name):
        label[0] = f"it{stages.iteration}:{name}"
        return start_stage(stages, name)

    evaluate = loop.evaluate

    def held_out_evaluation(*args, **kwargs):
        outer = label[0]
        label[0] = f"{outer.split(':')[0] if outer.startswith('it') else 'it0'}:held-out evaluation"
        try:
            return evaluate(*args, **kwargs)
        finally:  # then the iteration's bookkeeping (iteration 0: its row, samples and the trackers' start)
            label[0] = "it0:bookkeeping" if outer == "load" else f"{outer} (after the held-out evaluation)"

    loop.Stages.__call__, loop.evaluate = stage_started, held_out_evaluation

    def sample() -> None:
        while True:
            now, where = resident_bytes(), label[0]
            peaks[where] = max(peaks.get(where, 0), now)
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    try:
        raft_main(argv)
    finally:
        print("\npeak resident memory by stage (GiB):")
        for where, peak in peaks.items():
            print(f"  {where:28s} {peak / 2**30:6.2f}")
        print(f"  {'high-water mark (VmHWM)':28s} {high_water_mark_bytes() / 2**30:6.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
