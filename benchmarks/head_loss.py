"""The output head and the loss alone, forward and backward: the full logits then cross-entropy (xtune before
`xtune.engine.loss`, and what most trainers do) against `linear_cross_entropy` (fused, chunk by chunk).

    python benchmarks/head_loss.py [--tokens 2048] [--hidden 2048] [--vocab 92544] [--repeats 3]

InternLM2-1.8B's head by default (hidden 2,048, vocab 92,544), bf16 weights, bf16 autocast, every position
trained (the worst case for the fused loss: with chat data only the trained positions reach the head at all).
Prints seconds per forward+backward, each variant interleaved with the others, `--repeats` times after a warm-up.
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F

from xtune.engine.loss import linear_cross_entropy


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=92544)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(args.vocab, args.hidden, dtype=torch.bfloat16) * 0.02
    targets = torch.randint(0, args.vocab, (args.tokens,))
    autocast = torch.autocast(hidden.device.type, dtype=torch.bfloat16)

    def full_logits():
        with autocast:
            logits = F.linear(hidden, weight)
        return F.cross_entropy(logits.float(), targets, reduction="sum")

    def fused():
        with autocast:
            return linear_cross_entropy(hidden, weight, targets)

    variants = {"full_logits": full_logits, "fused": fused}
    seconds = {name: [] for name in variants}
    losses = {}
    for round_ in range(args.repeats + 1):
        for name, loss_of in variants.items():
            hidden.grad = None
            started = time.perf_counter()
            loss = loss_of()
            loss.backward()
            if round_:
                seconds[name].append(time.perf_counter() - started)
            losses[name] = loss.item()
    report = {"args": vars(args), "seconds": seconds, "best_s": {k: min(v) for k, v in seconds.items()}, "losses": losses,
              "fused_speedup": min(seconds["full_logits"]) / min(seconds["fused"])}  # fmt: skip
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
