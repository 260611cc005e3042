"""The peers a user would pick instead: vLLM's built-in, training-free `ngram` (prompt lookup)
and `suffix` (suffix decoding, when the installed vLLM has it and its dependency) against SJD++
and plain decoding, on the same prompts and seeds.

    python benchmarks/bench_peers.py [--model DIR] [--out benchmarks/results/peers]

One in-process engine per method (bf16, the digit model's guided defaults): forward passes per
image (tokens - accepted drafts; SJD++ with full windows, budget null, so that the count does not
depend on what the goodput controller makes of this machine), latency at batch 1, and images/s
at 1, 8 and 32 concurrent requests under each method's defaults, each timed right after plain
decoding of the same prompts and seeds (paired ratios, the median of 3 rounds), after one
untimed batch at each concurrency on every engine, plain's included (SJD++'s goodput controller
learns the machine on its first requests: a fresh engine's first batch of 32 ran at 0.31x plain,
the next two at 0.95x and 0.81x).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import bench_e2e  # noqa: E402  (sets the in-process engine environment first)
from vllm_sjdpp.provenance import provenance  # noqa: E402

from vllm_sjdpp.digits.tokens import GENERATED_LENGTH  # noqa: E402
from vllm_sjdpp.digits.train import DEFAULT_OUT  # noqa: E402

K = 8  # the peers' window; SJD++ runs its defaults (k = 32, draft_token_budget "auto")
METHODS = {
    "SJD++": {"method": "sjdpp"},
    "ngram": {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": 2, "prompt_lookup_max": 5},
    "suffix": {"method": "suffix", "num_speculative_tokens": K},
}
CONCURRENCIES = (1, 8, 32)
ROUNDS = 3


def warm_up(llm) -> None:
    """One untimed batch at each concurrency: what a server has seen before the timed requests."""
    for c in CONCURRENCIES:
        bench_e2e.generate(llm, None, [i % 10 for i in range(c)], seed=300)


def measure(plain, llm, images: int) -> dict:
    digits = [i % 10 for i in range(images)]
    with bench_e2e.draft_token_budget(llm, None):  # SJD++'s full windows; a peer's engine: no-op
        tokens, _, accepted, _ = bench_e2e.generate(llm, None, digits, seed=0)
    n = sum(map(len, tokens))
    warm_up(llm)
    latency, plain_latency = [], []
    for d in range(3):
        plain_latency.append(bench_e2e.generate(plain, None, [d], 100 + d)[1])
        latency.append(bench_e2e.generate(llm, None, [d], 100 + d)[1])
    return {
        "passes_per_image": (n - accepted) / images,
        "latency_speedup": float(np.median(plain_latency) / np.median(latency)),
        "throughput_x_plain": {  # the median of ROUNDS paired timings: one scatters widely here
            c: float(np.median([bench_e2e.paired_throughput(plain, llm, None, c, seed=200 + 100 * r)["ratio_vs_plain"]
                                for r in range(ROUNDS)]))
            for c in CONCURRENCIES},
    }


def main(argv: list[str] | None = None) -> None:
    from vllm import LLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/peers"))
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--top-k", type=int, default=None, help="override the model's top-k (-1: off)")
    args = ap.parse_args(argv)
    started = provenance()
    engine = dict(dtype="bfloat16", enforce_eager=True, max_model_len=GENERATED_LENGTH + 64, max_num_seqs=64,
                  seed=0, disable_log_stats=False)
    if args.top_k is not None:
        engine["override_generation_config"] = {"top_k": args.top_k}
    plain = LLM(str(args.model), **engine)
    warm_up(plain)  # as each method's engine below: both sides of a ratio warm
    results = {}
    for name, spec in METHODS.items():
        try:
            llm = LLM(str(args.model), speculative_config=spec, **engine)
        except Exception as e:  # a method this vLLM build cannot run: record why
            results[name] = {"unavailable": f"{type(e).__name__}: {str(e)[:300]}"}
            print(name, "unavailable:", results[name]["unavailable"])
            continue
        try:
            results[name] = measure(plain, llm, args.images)
        except Exception as e:  # vLLM's own method failing mid-run: record the exact failure
            results[name] = {"unavailable": f"crashed: {type(e).__name__}: {str(e)[:300]}"}
        print(name, json.dumps(results[name]), flush=True)
        del llm
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # One key per method, and "provenance" beside them.
    args.out.with_suffix(".json").write_text(json.dumps({**results, "provenance": started}, indent=1))
    lines = ["| method | passes/image (full windows) | latency x lower (batch 1) | "
             + " | ".join(f"images/s @{c} x plain" for c in CONCURRENCIES) + " |",
             "|---|---:|---:|" + "---:|" * len(CONCURRENCIES)]
    for name, r in results.items():
        if "unavailable" in r:
            lines.append(f"| {name} | unavailable: {r['unavailable'][:120]} |" + " |" * (1 + len(CONCURRENCIES)))
            continue
        cells = " | ".join(f"{r['throughput_x_plain'][c]:.2f}" for c in CONCURRENCIES)
        lines.append(f"| {name} | {r['passes_per_image']:.1f} | {r['latency_speedup']:.2f} | {cells} |")
    table = "\n".join(lines) + "\n"
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
