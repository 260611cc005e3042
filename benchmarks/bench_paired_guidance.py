"""What guidance costs with an unconditional context of another length: paired requests
(`guidance.pairing`) against the equal-length path, in both guidance layouts (`guidance.cfg`).

    python benchmarks/bench_paired_guidance.py [--model FOLDER] [--repeats 7] [--out benchmarks/results/paired_guidance.json]

The same requests every way: the digit model's class prompts (`<bos> a handwritten D <boi>`),
guided at scale 3, plain decoding, whole images (273 tokens, one pass each), at batch 1 and 32,
on two engines over the same folder:
- stacked (the digit model's default): both branches in each sequence, twice the KV heads;
- paired (`--hf-overrides '{"sjdpp_guidance_layout": "paired"}'`, Emu3's and Lumina-mGPT's
  default): one branch per sequence, every guided request a pair.
and two kinds of unconditional context:
- equal: the folder's rule, `<bos> <pad> <pad> <pad> <boi>` (the prompt's length);
- paired: `<bos> <boi>` as the negative prompt (Lumina-mGPT's kind of context, from the image
  start on).
The baseline is stacked/equal, guidance as it runs at equal lengths.  Every timing of a round is
taken back to back (in reverse order every other round); a case's time over the baseline is the
median over rounds of its ratio within the round (timings on a shared CPU drift between rounds).  KV per image: the engine's KV blocks
in use once every image of a batch holds 200 generated tokens (read from the scheduler's block
pool), divided by the images, and those blocks' bytes (the layouts' blocks differ in size).
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

ENGINE = dict(enforce_eager=True, max_model_len=GENERATED_LENGTH + 64, seed=0, max_num_seqs=64, block_size=32)
LAYOUTS = {"stacked": {}, "paired": {"hf_overrides": {"sjdpp_guidance_layout": "paired"}}}
CONTEXTS = {"equal": {"guidance_scale": 3.0}, "paired": {"guidance_scale": 3.0, "negative_prompt_token_ids": [BOS, BOI]}}
CASES = [(layout, context) for layout in LAYOUTS for context in CONTEXTS]
BASELINE = ("stacked", "equal")


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


def kv_bytes_per_block(llm) -> int:
    """Bytes of one KV block across the model's layers."""
    config = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_config
    return sum(g.kv_cache_spec.page_size_bytes * len(g.layer_names) for g in config.kv_cache_groups)


def main() -> None:
    from vllm import LLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    ap.add_argument("--model", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/paired_guidance.json"))
    args = ap.parse_args()
    started = provenance()

    engines = {layout: LLM(str(args.model), dtype=args.dtype, **ENGINE, **kw) for layout, kw in LAYOUTS.items()}
    block_bytes = {layout: kv_bytes_per_block(llm) for layout, llm in engines.items()}
    results = {
        "model": str(args.model), "block_size": ENGINE["block_size"], "kv_bytes_per_block": block_bytes,
        "baseline": "/".join(BASELINE), "batches": {}, "provenance": started,
    }
    for batch in args.batches:
        rounds = []
        for i in range(args.repeats + 1):  # the first round warms up
            order = CASES if i % 2 else CASES[::-1]  # no case always first after the one before
            r = {f"{lay}/{ctx}": timed(engines[lay], batch, CONTEXTS[ctx]) for lay, ctx in order}
            if i:
                rounds.append(r)
        row = {"rounds_s": rounds}
        base = "/".join(BASELINE)
        for lay, ctx in CASES:
            case = f"{lay}/{ctx}"
            blocks = kv_blocks_per_image(engines[lay], batch, CONTEXTS[ctx])
            row[case] = {
                "ms_per_pass": 1e3 * statistics.median(r[case] for r in rounds) / GENERATED_LENGTH,
                "kv_blocks_per_image": blocks,
                "kv_bytes_per_image": blocks * block_bytes[lay],
            }
        for lay, ctx in CASES:
            case = row[f"{lay}/{ctx}"]
            case["time_over_baseline"] = statistics.median(r[f"{lay}/{ctx}"] / r[base] for r in rounds)
            case["kv_over_baseline"] = case["kv_bytes_per_image"] / row[base]["kv_bytes_per_image"]
            print(f"batch {batch:>3} {lay:>7} layout, {ctx:>6} context: {case['ms_per_pass']:.2f} ms/pass "
                  f"({case['time_over_baseline']:.2f}x), KV {case['kv_bytes_per_image'] / 2**10:.0f} KiB per image "
                  f"({case['kv_over_baseline']:.2f}x; {case['kv_blocks_per_image']:.2f} blocks)")
        results["batches"][str(batch)] = row
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
