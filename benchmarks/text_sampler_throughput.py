"""Tokens/s of raft's text sampler against LMFlow's way of sampling: `generate(num_return_sequences=K)`
called one prompt at a time. Same model, prompts, seed and sampling settings, measured in one run.

    .venv/bin/python benchmarks/text_sampler_throughput.py [--prompts 16] [--k 8] [--max-new-tokens 40]

Prints the figures, the ratio, and each method's share of the roofline: the machine's matmul rate at the sampler's
shapes (measured in the same run, float32 and bfloat16) over the matmul FLOPs of one token. It asserts nothing (a
benchmark, not a test).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from raft.modalities.text.config import LoraConfig, TextDataConfig, TextGenerationConfig, TextModelConfig
from raft.modalities.text.data import load_text_data
from raft.modalities.text.model import load_policy
from raft.modalities.text.sampler import TextSampler


def naive(policy, prompts, k, settings, seed):
    """LMFlow's loop: one prompt per generate() call, K return sequences."""
    torch.manual_seed(seed)
    tokens = 0
    for prompt in prompts:
        ids = torch.tensor([policy.encode_prompt(prompt)], device=policy.device)
        with torch.no_grad():
            out = policy.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), num_return_sequences=k,
                                        do_sample=True, pad_token_id=policy.tokenizer.pad_token_id,
                                        eos_token_id=sorted(policy.eos_ids), **settings)
        for row in out[:, ids.shape[1]:].tolist():
            end = next((j for j, t in enumerate(row) if t in policy.eos_ids), None)
            tokens += len(row) if end is None else end + 1
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64,
                        help="raft sampler: sequences per batch (generation.batch_size's text default)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=2,
                        help="measure each method this many times, interleaved, so load drift hits all alike")
    parser.add_argument("--bf16", choices=["auto", "yes", "no"], default="auto",
                        help="also measure the bfloat16 copy; auto: where the hardware runs bf16 natively (avx512_bf16/AMX, "
                        "CUDA), as model.inference_dtype auto picks it (emulated bf16 is several times slower than float32)")
    args = parser.parse_args()

    from raft.memory import keep_freed_memory

    keep_freed_memory()  # as the raft command does; RAFT_MALLOC=system measures without it
    policy = load_policy(TextModelConfig(name_or_path=args.model, device=args.device), LoraConfig(), None)
    from raft.finetune.distributed import has_fast_bf16

    with_bf16 = args.bf16 == "yes" or (args.bf16 == "auto" and has_fast_bf16(policy.device))
    if not with_bf16:
        print("bfloat16 not measured: not native on this hardware (--bf16 yes measures it anyway)")
    bf16_policy = load_policy(TextModelConfig(name_or_path=args.model, device=args.device, inference_dtype="bfloat16"),
                              LoraConfig(), None) if with_bf16 else None
    prompts = load_text_data(TextDataConfig()).prompts[: args.prompts]
    settings = dict(temperature=args.temperature, top_p=1.0, top_k=0, max_new_tokens=args.max_new_tokens)
    print(f"model {args.model} on {policy.device}, torch threads {torch.get_num_threads()}; "
          f"{len(prompts)} IMDB prompts x K={args.k}, {args.max_new_tokens} new tokens, temperature {args.temperature}")

    naive(policy, prompts[:1], 2, {**settings, "max_new_tokens": 4}, seed=0)  # warm-up
    methods = {
        "naive: generate(num_return_sequences=K) per prompt": lambda: naive(policy, prompts, args.k, settings, 0),
        "raft sampler, batched, no shared prefill": lambda: sample(policy, prompts, args, share=False),
        "raft sampler (default: batched + shared prefill)": lambda: sample(policy, prompts, args, share=True),
        "raft sampler, model.inference_dtype=bfloat16": lambda: sample(bf16_policy, prompts, args, share=True),
    }
    if bf16_policy is None:
        methods.pop("raft sampler, model.inference_dtype=bfloat16")
    totals = {name: [0, 0.0] for name in methods}
    for round_index in range(args.rounds):
        for name, run in methods.items():
            started = time.perf_counter()
            tokens = run()
            seconds = time.perf_counter() - started
            totals[name][0] += tokens
            totals[name][1] += seconds
            print(f"round {round_index + 1}: {name:52s} {tokens:6d} tokens {seconds:7.1f} s "
                  f"{tokens / seconds:8.1f} tok/s", flush=True)
    rates = {name: tokens / seconds for name, (tokens, seconds) in totals.items()}
    base = rates[next(iter(methods))]
    per_token = flops_per_token(policy.model)
    matmul = {dtype: matmul_rate(policy.model, args.batch_size, dtype) for dtype in (torch.float32, torch.bfloat16)}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "?") if os.path.exists("/proc/cpuinfo") else "?"
    print(f"\nCPU: {cpu}; bf16 native: {has_fast_bf16(policy.device)}")
    print(f"roofline: {per_token / 1e9:.3f} GFLOP per sampled token (2 x the weights of every matmul, the output "
          f"head included); the machine's matmul rate at the sampler's shapes ({args.batch_size} rows): "
          f"float32 {matmul[torch.float32] / 1e9:.1f} GFLOP/s, bfloat16 {matmul[torch.bfloat16] / 1e9:.1f} GFLOP/s")
    for name, rate in rates.items():
        dtype = torch.bfloat16 if "bfloat16" in name else torch.float32
        roofline = matmul[dtype] / per_token
        print(f"{name:52s} {rate:8.1f} tok/s   {rate / base:5.2f}x naive   {rate / roofline:5.1%} of the "
              f"{str(dtype).removeprefix('torch.')} roofline ({roofline:.0f} tok/s)"
              + (f", {rate / (matmul[torch.float32] / per_token):5.1%} of float32's" if dtype != torch.float32 else ""))


def flops_per_token(model) -> float:
    """Matmul FLOPs of one decoded token: 2 x the weights of every linear layer (the output head included, tied to
    the embedding or not); attention over the cache is left out (a few % at these lengths)."""
    return 2.0 * sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def matmul_rate(model, rows: int, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """FLOP/s of this machine's matmuls at one decode step's shapes: `rows` tokens times every linear layer's weight,
    timed over `seconds`."""
    weights = [m.weight.detach().to(dtype) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=dtype) for w in weights}
    step = lambda: [inputs[w.shape[1]] @ w.T for w in weights]
    step()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step()
        done += 1
    return done * 2.0 * rows * sum(w.numel() for w in weights) / (time.perf_counter() - started)


def sample(policy, prompts, args, share: bool) -> int:
    config = TextGenerationConfig(temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                  batch_size=args.batch_size, share_prompt_prefill=share)
    samples = TextSampler(policy, config, progress=False).generate(prompts, args.k, seed=0)
    return sum(s.meta["new_tokens"] for s in samples)


if __name__ == "__main__":
    main()
