"""What classifier-free guidance costs: a guided forward pass against an unguided one, and the KV
cache capacity, on the bundled digit model.

    python benchmarks/bench_guidance_cost.py [--repeats 5] [--out benchmarks/results/guidance_cost.json]

The same weights served twice in one process: guided (the folder's GuidedLlamaForCausalLM, both
branches in every pass) and unguided (hf_overrides: LlamaForCausalLM).  Plain decoding, no
speculation, whole images (273 tokens, one pass each), at batch 1 and 32.  Every guided timing is
paired with an unguided one just before it (this machine drifts between minutes); the ratio
of the medians is reported.  KV capacity: the tokens vLLM's KV cache holds for each engine, out
of the same VLLM_CPU_KVCACHE_SPACE.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

for key, value in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(key, value)

from vllm_sjdpp.digits.tokens import GENERATED_LENGTH, prompt_ids  # noqa: E402
from vllm_sjdpp.digits.train import DEFAULT_OUT  # noqa: E402

ENGINE = dict(enforce_eager=True, max_model_len=GENERATED_LENGTH + 64, seed=0, max_num_seqs=64)


def timed(llm, batch: int, extra_args: dict | None) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=1.0, top_k=10, max_tokens=GENERATED_LENGTH, ignore_eos=True, extra_args=extra_args)
    prompts = [{"prompt_token_ids": prompt_ids(i % 10)} for i in range(batch)]
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start


def kv_capacity_tokens(llm) -> int:
    cache = llm.llm_engine.vllm_config.cache_config
    return int(cache.num_gpu_blocks * cache.block_size)


def main() -> None:
    from vllm import LLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    ap.add_argument("--model", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/guidance_cost.json"))
    args = ap.parse_args()

    unguided = LLM(str(args.model), hf_overrides={"architectures": ["LlamaForCausalLM"]}, **ENGINE)
    guided = LLM(str(args.model), **ENGINE)
    results = {
        "kv_capacity_tokens": {"unguided": kv_capacity_tokens(unguided), "guided": kv_capacity_tokens(guided)},
        "batches": {},
    }
    for batch in args.batches:
        timed(unguided, batch, None)  # warm-up
        timed(guided, batch, {"guidance_scale": 3.0})
        pairs = [(timed(unguided, batch, None), timed(guided, batch, {"guidance_scale": 3.0})) for _ in range(args.repeats)]
        u, g = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
        results["batches"][str(batch)] = {
            "unguided_ms_per_pass": 1e3 * u / GENERATED_LENGTH, "guided_ms_per_pass": 1e3 * g / GENERATED_LENGTH,
            "guided_over_unguided": g / u, "pairs_s": pairs,
        }
        print(f"batch {batch:>3}: unguided {1e3 * u / GENERATED_LENGTH:.2f} ms/pass, guided "
              f"{1e3 * g / GENERATED_LENGTH:.2f} ms/pass: {g / u:.2f}x (median of {args.repeats} pairs)")
    kv = results["kv_capacity_tokens"]
    print(f"KV cache capacity: unguided {kv['unguided']:,} tokens, guided {kv['guided']:,} tokens "
          f"({kv['unguided'] / kv['guided']:.2f}x fewer)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
