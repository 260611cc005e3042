"""What an unconditional context of another length costs: paired requests (`guidance.pairing`)
against the equal-length path, on one guided engine.

    python benchmarks/bench_paired_guidance.py [--model FOLDER] [--repeats 3] [--out benchmarks/results/paired_guidance.json]

The same requests either way: the digit model's class prompts (`<bos> a handwritten D <boi>`),
guided at scale 3, plain decoding, whole images (273 tokens, one pass each), at batch 1 and 32.
- equal: the folder's rule, `<bos> <pad> <pad> <pad> <boi>` (the prompt's length: one sequence,
  both branches in its pass);
- paired: `<bos> <boi>` as the negative prompt (Lumina-mGPT's kind of context, from the image
  start on: two sequences per image, each run with both branches).
Every timing of a round is taken back to back; the ratio of the medians is reported.  KV per
image: the engine's KV blocks in use, divided by the images, once every image of a batch holds
200 generated tokens (read from the scheduler's block pool).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from vllm_sjdpp.provenance import provenance

for key, value in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(key, value)

from vllm_sjdpp.digits.tokens import BOI, BOS, GENERATED_LENGTH, prompt_ids  # noqa: E402
from vllm_sjdpp.digits.train import DEFAULT_OUT  # noqa: E402

ENGINE = dict(enforce_eager=True, max_model_len=GENERATED_LENGTH + 64, seed=0, max_num_seqs=64)
PATHS = {"equal": {"guidance_scale": 3.0}, "paired": {"guidance_scale": 3.0, "negative_prompt_token_ids": [BOS, BOI]}}


def sampling(extra_args: dict, max_tokens: int = GENERATED_LENGTH):
    from vllm import SamplingParams

    return SamplingParams(temperature=1.0, top_k=10, max_tokens=max_tokens, ignore_eos=True, extra_args=extra_args)


def timed(llm, batch: int, extra_args: dict) -> float:
    prompts = [{"prompt_token_ids": prompt_ids(i % 10)} for i in range(batch)]
    start = time.perf_counter()
    llm.generate(prompts, sampling(extra_args), use_tqdm=False)
    return time.perf_counter() - start


def kv_blocks_per_image(llm, batch: int, extra_args: dict, generated: int = 200) -> float:
    """KV blocks in use per image once each holds `generated` tokens."""
    engine = llm.llm_engine
    pool = engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    for i in range(batch):
        engine.add_request(f"kv-{i}", {"prompt_token_ids": prompt_ids(i % 10)}, sampling(extra_args, generated + 1))
    held = 0
    for _ in range(10 * generated):
        outputs = engine.step()
        held = max(held, pool.num_gpu_blocks - pool.get_num_free_blocks())
        if any(o.finished for o in outputs):
            break
    while engine.has_unfinished_requests():
        engine.step()
    return held / batch


def main() -> None:
    from vllm import LLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    ap.add_argument("--model", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/paired_guidance.json"))
    args = ap.parse_args()
    started = provenance()

    llm = LLM(str(args.model), dtype=args.dtype, **ENGINE)
    cache = llm.llm_engine.vllm_config.cache_config
    results = {"model": str(args.model), "block_size": cache.block_size, "batches": {}, "provenance": started}
    for batch in args.batches:
        rounds = []
        for i in range(args.repeats + 1):  # the first round warms up
            r = {path: timed(llm, batch, extra) for path, extra in PATHS.items()}
            if i:
                rounds.append(r)
        median = {k: statistics.median(r[k] for r in rounds) for k in PATHS}
        kv = {path: kv_blocks_per_image(llm, batch, extra) for path, extra in PATHS.items()}
        ms = {k: 1e3 * v / GENERATED_LENGTH for k, v in median.items()}
        results["batches"][str(batch)] = {
            **{f"{k}_ms_per_pass": v for k, v in ms.items()},
            "paired_over_equal": median["paired"] / median["equal"],
            **{f"{k}_kv_blocks_per_image": v for k, v in kv.items()},
            "rounds_s": rounds,
        }
        print(f"batch {batch:>3}: equal {ms['equal']:.2f} ms/pass, paired {ms['paired']:.2f} "
              f"({median['paired'] / median['equal']:.2f}x); KV blocks per image at 200 tokens: "
              f"equal {kv['equal']:.1f}, paired {kv['paired']:.1f} (median of {args.repeats} rounds)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
