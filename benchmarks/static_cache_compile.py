"""Does a static key/value cache, or `torch.compile` over it, speed up sampling the offline default's model here?

    .venv/bin/python benchmarks/static_cache_compile.py                 # all three modes, one process each
    .venv/bin/python benchmarks/static_cache_compile.py --mode compile  # one mode

Plain `generate()` on raft's bfloat16 inference copy of SmolLM2-135M-Instruct (the dtype raft samples in here),
64 rows of 12-token prompts, greedy (the matmuls and the cache are what is measured, not the draw), in three
modes: the dynamic cache (what raft's sampler uses), `cache_implementation="static"`, and the static cache with
the model's forward under `torch.compile`. Each round times a call with exactly --new-tokens tokens and one with 4;
the decoding rate is the difference's tokens over the difference's time, so the prompt's prefill and per-call
set-up cancel out. (Why: plain generate() asks the prefill for the last position's logits through a
non-contiguous slice, and when the weights do not require gradients, as in raft's frozen copies, matmul then
copies the 49k x 576 output weight once per row: 3.3 s for 64 rows. raft's sampler prefills with an index tensor
instead, `last_logits_only`.) The first round of `compile` includes compiling, printed apart. Each mode runs in a
fresh process, so compiled code and caches do not carry over. Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

MODES = ("dynamic", "static", "compile")


def measure(mode: str, rows: int, new_tokens: int, calls: int) -> None:
    import torch

    import raft
    from raft.modalities.text.model import copy_in_dtype, load_policy

    config = raft.load_config("text")
    policy = load_policy(config.model, config.finetune.lora, None)
    model = copy_in_dtype(policy.model, torch.bfloat16).eval()
    prompts = torch.randint(100, 20000, (rows, 12), generator=torch.Generator().manual_seed(0))
    settings = dict(do_sample=False, pad_token_id=policy.tokenizer.pad_token_id)
    if mode != "dynamic":
        settings["cache_implementation"] = "static"
    if mode == "compile":
        model.forward = torch.compile(model.forward, dynamic=False)

    def timed(tokens: int) -> float:
        started = time.perf_counter()
        model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=tokens,
                       min_new_tokens=tokens, **settings)
        return time.perf_counter() - started

    with torch.no_grad():
        for call in range(calls):
            long, short = timed(new_tokens), timed(4)
            rate = rows * (new_tokens - 4) / (long - short)
            first = " (the first includes compiling)" if mode == "compile" and call == 0 else ""
            print(f"{mode:8s} round {call + 1}: {new_tokens} tokens {long:6.2f} s, 4 tokens {short:5.2f} s: "
                  f"decoding {rate:6.1f} tok/s{first}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=MODES)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args()
    if args.mode:
        measure(args.mode, args.rows, args.new_tokens, args.calls)
        return
    for mode in MODES:
        subprocess.run([sys.executable, str(Path(__file__)), "--mode", mode, "--rows", str(args.rows),
                        "--new-tokens", str(args.new_tokens), "--calls", str(args.calls)], check=True)


if __name__ == "__main__":
    main()
