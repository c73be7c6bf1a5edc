"""Why raft's prefills pass `logits_to_keep` as an index tensor (raft.modalities.text.model.last_logits_only).

`logits_to_keep=1` hands the language-model head the hidden states' last position as a non-contiguous view; the
head's linear layer then runs a batched matmul that copies its weight once per row. This times the head of
SmolLM2-135M's shape (vocabulary 49,152 x hidden 576) on 16 prompts' last positions three ways, in the same run:

    OMP_NUM_THREADS=1 python benchmarks/lm_head_slice.py            # bfloat16 and float32

Printed: milliseconds per call and each way's time as a multiple of the contiguous input's.
"""

import argparse
import time

import torch


def per_call_ms(weight: torch.Tensor, hidden: torch.Tensor, repeats: int) -> float:
    torch.nn.functional.linear(hidden, weight)  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        torch.nn.functional.linear(hidden, weight)
    return (time.perf_counter() - started) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt-length", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        weight = torch.randn(49152, 576, dtype=dtype)
        hidden = torch.randn(args.rows, args.prompt_length, 576, dtype=dtype)
        ways = {
            "logits_to_keep=1 (a view)": hidden[:, -1:, :],
            "index tensor (raft)": hidden[:, torch.tensor([args.prompt_length - 1]), :],
            "contiguous": hidden[:, -1:, :].contiguous(),
        }
        times = {name: per_call_ms(weight, x, args.repeats) for name, x in ways.items()}
        base = times["contiguous"]
        for name, ms in times.items():
            print(f"{str(dtype).removeprefix('torch.'):9s} {name:27s} {ms:8.1f} ms  {ms / base:6.1f} x contiguous")


if __name__ == "__main__":
    main()
