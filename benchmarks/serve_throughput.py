"""`xtune serve` under load: aggregate tokens/s and latency at 1, 4 and 16 concurrent clients, against a plain
transformers `generate` loop, all in one run.

    OMP_NUM_THREADS=1 python benchmarks/serve_throughput.py [--requests 16] [--max-tokens 64] [--threads 1] [--rounds 3]

The model is a random-weight Llama built by xtune.testing (hidden 512, 8 layers: ~29M parameters, the tiny
tokenizer's 2.6k vocab), served in float32 by the real app (uvicorn on loopback, the official `openai` client in
threads). Each level sends the same `--requests` chat requests (prompts of different lengths, greedy,
`max_tokens`, no stop words), `--clients` at a time; "one client at a time" is level 1. The `generate` loop runs
the same prompts one after another through `model.generate` with the same max tokens. Tokens are the completion
tokens the server reports (a reply may end early at the template's stop token), so tokens/s compares like with
like. The levels run interleaved, `--rounds` times; prints one JSON object with every run and the ratios of the
median aggregate tokens/s.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import openai  # noqa: E402
import uvicorn  # noqa: E402

from xtune.data.formats import Conversation, Turn  # noqa: E402
from xtune.data.templates import get_template  # noqa: E402
from xtune.infer.generate import GenerationOptions, generation_kwargs, prompt_ids  # noqa: E402
from xtune.infer.serve import build_app  # noqa: E402
from xtune.testing.tiny import TinySpec, build_model, build_tokenizer  # noqa: E402

SPEC = TinySpec("llama", hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=8, rope_theta=10_000.0, seed=7)  # fmt: skip
WORDS = "the quick brown fox jumps over a lazy dog while seven tired cats sleep near an old red barn".split()


def prompts(count: int) -> list[str]:
    return [f"Request {index}: " + " ".join(WORDS[: 4 + (index * 5) % len(WORDS)]) for index in range(count)]


def serve_in_thread(app):
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return server, thread, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"


def run_level(url: str, texts: list[str], clients: int, max_tokens: int) -> dict:
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)

    def ask(text: str) -> tuple[float, int]:
        start = time.perf_counter()
        response = client.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0, stop=[]
        )
        return time.perf_counter() - start, response.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(ask, texts))
    wall = time.perf_counter() - start
    latencies, tokens = [latency for latency, _ in results], sum(count for _, count in results)
    return {
        "clients": clients, "requests": len(texts), "completion_tokens": tokens, "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1), "latency_mean_s": round(statistics.mean(latencies), 2),
        "latency_max_s": round(max(latencies), 2),
    }  # fmt: skip


def generate_loop(model, tokenizer, template, texts: list[str], max_tokens: int) -> dict:
    kwargs = generation_kwargs(template, tokenizer, GenerationOptions(max_new_tokens=max_tokens))
    tokens, latencies = 0, []
    start = time.perf_counter()
    for text in texts:
        began = time.perf_counter()
        ids = torch.tensor([prompt_ids(Conversation((Turn("user", text),)), template, tokenizer)])
        with torch.no_grad():
            output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        tokens += output.shape[1] - ids.shape[1]
        latencies.append(time.perf_counter() - began)
    wall = time.perf_counter() - start
    return {
        "requests": len(texts), "completion_tokens": tokens, "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1), "latency_mean_s": round(statistics.mean(latencies), 2),
    }  # fmt: skip


def cpu_description() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    flags = set(fields.get("flags\t\t", "").split())
    wanted = ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma"]
    return {"cpu": fields.get("model name\t", platform.processor()).strip(), "flags": [f for f in wanted if f in flags],
            "cores_visible": os.cpu_count(), "load_average_at_start": os.getloadavg()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=3, help="Each level this many times; medians are compared.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer()
    model = build_model(SPEC, len(tokenizer)).float()
    template = get_template("internlm2_chat")
    texts = prompts(args.requests)
    app = build_app(model, tokenizer, template, "bench", max_batch_size=16, max_queued_requests=None)
    server, thread, url = serve_in_thread(app)
    run_level(url, texts[:2], 2, 4)  # warm up
    report = {"machine": cpu_description(), "torch_threads": torch.get_num_threads(),
              "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
              "max_tokens": args.max_tokens}  # fmt: skip
    levels = [int(clients) for clients in args.levels.split(",")]
    rounds: dict[str, list[dict]] = {"generate_loop": [], **{str(clients): [] for clients in levels}}
    for _ in range(args.rounds):  # the levels interleaved, so that a change of load on a shared machine hits all
        rounds["generate_loop"].append(generate_loop(model, tokenizer, template, texts, args.max_tokens))
        for clients in levels:
            rounds[str(clients)].append(run_level(url, texts, clients, args.max_tokens))
    server.should_exit = True
    thread.join(timeout=10)
    report["rounds"] = rounds
    median = {name: statistics.median(run["tokens_per_s"] for run in runs) for name, runs in rounds.items()}
    report["median_tokens_per_s"] = median
    one = median[str(levels[0])]
    report["ratios"] = {
        f"{clients}_clients_over_one_at_a_time": round(median[str(clients)] / one, 2) for clients in levels
    }
    report["ratios"]["max_clients_over_generate_loop"] = round(median[str(levels[-1])] / median["generate_loop"], 2)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
