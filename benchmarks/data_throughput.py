"""Tokenize + pack throughput: samples/s for N alpaca-sized samples, one process and num_proc workers.

    python benchmarks/data_throughput.py [--samples 100000] [--num-proc 2] [--max-length 2048]

The samples are synthetic alpaca records (instruction 8-30 words, input 0-40, output 30-200, words
from the tiny tokenizer's corpus) rendered with internlm2_chat and the tiny byte-level BPE tokenizer.
"""

import argparse
import json
import random
import time

from xtune.config.schema import Config
from xtune.data.dataset import encode_parallel
from xtune.data.encode import encode, encode_batch
from xtune.data.formats import alpaca_to_standard
from xtune.data.packing import pack, packing_efficiency
from xtune.data.templates import get_template
from xtune.testing.tiny import CORPUS, build_tokenizer


def alpaca_records(count: int, seed: int = 0) -> list[dict]:
    words = CORPUS.read_text().split()
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choices(words, k=rng.randint(low, high)))

    return [{"instruction": text(8, 30), "input": text(0, 40), "output": text(30, 200)} for _ in range(count)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=2048)
    args = parser.parse_args()

    tokenizer = build_tokenizer()
    template = get_template("internlm2_chat")
    config = Config(llm_name_or_path="-", data_path="-", max_length=args.max_length)
    start = time.perf_counter()
    conversations = [alpaca_to_standard(r) for r in alpaca_records(args.samples)]
    results = {"samples": args.samples, "map_samples_per_s": args.samples / (time.perf_counter() - start)}
    for num_proc in sorted({1, args.num_proc}):
        start = time.perf_counter()
        encoded = encode_parallel(conversations, template, tokenizer, config, num_proc)
        results[f"encode_samples_per_s_num_proc_{num_proc}"] = args.samples / (time.perf_counter() - start)
    subset = conversations[:20_000]
    start = time.perf_counter()
    one_by_one = [encode(c, template, tokenizer, args.max_length) for c in subset]
    results["encode_one_by_one_samples_per_s"] = len(subset) / (time.perf_counter() - start)
    start = time.perf_counter()
    assert encode_batch(subset, template, tokenizer, args.max_length) == one_by_one
    results["encode_batch_same_subset_samples_per_s"] = len(subset) / (time.perf_counter() - start)
    start = time.perf_counter()
    rows = pack(encoded, args.max_length, tokenizer.pad_token_id, shuffle_seed=0)
    results["pack_samples_per_s"] = args.samples / (time.perf_counter() - start)
    results["rows"] = len(rows)
    results["packing_efficiency"] = packing_efficiency(rows, args.max_length)
    results["mean_tokens_per_sample"] = sum(len(e.input_ids) for e in encoded) / len(encoded)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
