"""Causal attention of one sample on the CPU, forward + backward: SDPA's kernels and the alternatives tried.

    python benchmarks/attention_cpu.py [--lengths 300,1000,2000] [--heads 8] [--head-dim 64]
    python benchmarks/attention_cpu.py --lengths 100,300,425,800 --variants flash,flash_fp32,explicit_backward --split
    python benchmarks/attention_cpu.py --lengths 100,300,800 --batch 8 --variants flash,flash_batched

What xtune's packed CPU path runs once per sample (`xtune.models.attention`: SDPA, whose CPU flash kernel it
picks), bf16. GFLOP/s counts the useful work only: 6 n^2 d per sample and layer (forward QK^T and AV over the
causal half, backward twice that), the numerator MFU uses in benchmarks/train_throughput.py; compare with the
matmul peak that script measures. Variants:
- `flash`: SDPA's CPU flash kernel (xtune's path); `flash_fp32`: the same kernel on fp32 inputs;
- `math`: SDPA's math backend;
- `explicit`: QK^T, mask, softmax in fp32, PV as plain autograd ops (the whole square);
- `blocked`: the same by blocks of 256 queries, each against the keys up to its end (skips most of the masked half);
- `explicit_backward`: the flash kernel forward (it returns the log-sum-exp) and the backward as five matmuls;
- `flash_batched`: `--batch` samples of the same length in one call instead of one call each (right padding
  would make unequal lengths the same under a causal mask).
`--split` reports forward and backward apart.
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def flash(q, k, v):
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def math_backend(q, k, v):
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def explicit(q, k, v, start=0):
    """Queries q (positions start.. of the sample) against keys k, v (positions 0..)."""
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    masked = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).triu_(start + 1)
    return torch.softmax(scores.masked_fill(masked, float("-inf")), -1).to(q.dtype) @ v


def blocked(q, k, v, block=256):
    n = q.shape[-2]
    return torch.cat([explicit(q[..., s : s + block, :], k[..., : s + block, :], v[..., : s + block, :], s)
                      for s in range(0, n, block)], dim=-2)  # fmt: skip


class FlashForwardExplicitBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        out, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=True)[:2]
        ctx.save_for_backward(q, k, v, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, logsumexp = ctx.saved_tensors
        n, scale = q.shape[-2], q.shape[-1] ** -0.5
        probs = (q @ k.transpose(-1, -2)).float().mul_(scale).sub_(logsumexp.unsqueeze(-1))
        probs = probs.masked_fill_(torch.ones(n, n, dtype=torch.bool).triu_(1), float("-inf")).exp_()
        grad_v = probs.to(q.dtype).transpose(-1, -2) @ grad
        grad_probs = (grad @ v.transpose(-1, -2)).float()
        delta = (grad.float() * out.float()).sum(-1, keepdim=True)
        grad_scores = probs.mul_(grad_probs.sub_(delta)).to(q.dtype)
        return (grad_scores @ k) * scale, (grad_scores.transpose(-1, -2) @ q) * scale, grad_v


VARIANTS = {
    "flash": flash, "flash_fp32": flash, "math": math_backend, "explicit": explicit, "blocked": blocked,
    "explicit_backward": FlashForwardExplicitBackward.apply, "flash_batched": flash,
}  # fmt: skip


def timed(fn, repeats: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="300,1000,2000")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--variants", default="flash,math")
    parser.add_argument("--batch", type=int, default=1, help="samples of each length (one call each, or one call: flash_batched)")
    parser.add_argument("--split", action="store_true", help="forward and backward timed apart")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    for n in (int(length) for length in args.lengths.split(",")):
        for name in args.variants.split(","):
            dtype = torch.float32 if name == "flash_fp32" else torch.bfloat16
            shape = (args.batch, args.heads, n, args.head_dim)
            q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
            grad = torch.randn(shape, dtype=dtype)
            attend = VARIANTS[name]

            def forward():
                if name == "flash_batched":
                    return attend(q, k, v)
                return torch.cat([attend(q[b : b + 1], k[b : b + 1], v[b : b + 1]) for b in range(args.batch)])

            seconds = timed(lambda: forward().backward(grad), args.repeats)
            useful = 6 * n * n * args.head_dim * args.heads * args.batch
            row = {"tokens": n, "batch": args.batch, "variant": name, "ms": seconds * 1e3, "gflops": useful / seconds / 1e9}
            if args.split:
                with torch.no_grad():
                    row["forward_ms"] = timed(forward, args.repeats) * 1e3
                row["backward_ms"] = row["ms"] - row["forward_ms"]
            results.append(row)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
