"""Causal attention of one sample on the CPU, forward + backward, through SDPA's flash and math backends.

    python benchmarks/attention_cpu.py [--lengths 300,1000,2000] [--heads 8] [--head-dim 64]

What xtune's packed CPU path runs once per sample (`xtune.models.attention`), bf16. GFLOP/s counts the useful
work only: 6 n^2 d per sample and layer (forward QK^T and AV over the causal half, backward twice that), the
numerator MFU uses in benchmarks/train_throughput.py; compare with the matmul peak that script measures.
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="300,1000,2000")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    results = []
    for n in (int(length) for length in args.lengths.split(",")):
        q, k, v = (torch.randn(1, args.heads, n, args.head_dim, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):

            def step():
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

            step()
            started = time.perf_counter()
            for _ in range(args.repeats):
                step()
            seconds = (time.perf_counter() - started) / args.repeats
            useful = 6 * n * n * args.head_dim * args.heads
            results.append({"tokens": n, "backend": backend.name, "ms": seconds * 1e3, "gflops": useful / seconds / 1e9})
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
