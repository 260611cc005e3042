"""What guidance costs with an unconditional context of another length: paired requests
(`guidance.pairing`) against the equal-length path, in both guidance layouts (`guidance.cfg`).

    python benchmarks/bench_paired_guidance.py [--model FOLDER | --family emu3] [--repeats 7] [--out FILE]

Two engines over the same folder:
- stacked (the digit model's default): both branches in each sequence, twice the KV heads;
- paired (`--hf-overrides '{"sjdpp_guidance_layout": "paired"}'`, Emu3's and Lumina-mGPT's
  default): one branch per sequence, every guided request a pair;
and two kinds of unconditional context, guided at scale 3, plain decoding of whole images, at
batch 1 and 32:
- digit model (or its twin): its class prompts (`<bos> a handwritten D <boi>`, 273 tokens per
  image); equal, the folder's rule (`<bos> <pad> <pad> <pad> <boi>`, the prompt's length);
  paired, `<bos> <boi>` as the negative prompt (Lumina-mGPT's kind of context);
- Emu3 (`--family emu3`): the tiny real-shaped folder (Emu3-Gen's vocabulary of 184622, random
  weights), 64 px images (75 tokens); paired, the family's rule (the empty prompt, 6 tokens
  against the prompts' 27); equal, a context of the prompt's length.
The baseline is stacked/equal, guidance as it runs at equal lengths.  Every timing of a round is
taken back to back (in reverse order every other round); a case's time over the baseline is the
median over rounds of its ratio within the round (timings on a shared CPU drift between rounds).
KV per image: the engine's KV blocks in use once every image of a batch holds most of its tokens
(digits: 200), read from the scheduler's block pool, divided by the images, and those blocks'
bytes (a stacked block holds twice the heads of a paired one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from vllm_sjdpp.provenance import provenance

for key, value in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(key, value)

from vllm_sjdpp.digits.tokens import BOI, BOS, GENERATED_LENGTH, prompt_ids  # noqa: E402
from vllm_sjdpp.digits.train import DEFAULT_OUT  # noqa: E402

LAYOUTS = {"stacked": {"hf_overrides": {"sjdpp_guidance_layout": "stacked"}},
           "paired": {"hf_overrides": {"sjdpp_guidance_layout": "paired"}}}
CONTEXTS = ("equal", "paired")
CASES = [(layout, context) for layout in LAYOUTS for context in CONTEXTS]
BASELINE = ("stacked", "equal")


@dataclass
class Workload:
    """A folder, its engine options, 10 prompts, each context's extra_args, the tokens of an image,
    its top-k, and where KV is read."""

    folder: Path
    engine: dict
    prompts: list[list[int]]
    contexts: dict[str, dict]
    tokens: int
    top_k: int
    kv_at: int  # generated tokens per image when the KV in use is read


def digits(folder: Path) -> Workload:
    return Workload(
        folder, dict(enforce_eager=True, max_model_len=GENERATED_LENGTH + 64, seed=0, max_num_seqs=64, block_size=32),
        [prompt_ids(d) for d in range(10)],
        {"equal": {"guidance_scale": 3.0}, "paired": {"guidance_scale": 3.0, "negative_prompt_token_ids": [BOS, BOI]}},
        GENERATED_LENGTH, 10, 200,
    )


def emu3(size: int = 64) -> Workload:
    """The tiny real-shaped Emu3 folder (tests/tiny_emu3.py: Emu3-Gen's vocabulary of 184622,
    random weights), images of size x size px, its top-k: paired, the family's rule (the empty
    prompt: `<bos>` and the image header, what a token-id request gets by default; BAAI's
    negative prompt, 203 tokens against the prompts' 27, would measure its own length); equal, a
    context of the prompt's length (the prompt's own ids: the cost, not the image, is measured)."""
    import sys
    import tempfile

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from tiny_emu3 import build_tiny_emu3

    from vllm_sjdpp.families.emu3 import DEFAULT_TOP_K, Emu3Family

    folder = build_tiny_emu3(Path(tempfile.mkdtemp()) / "emu3")
    family, shape = Emu3Family(folder), (size, size)
    texts = ["a red fox in the snow", "two boats at dawn", "a tree on a hill", "a city at night", "a cat"]
    prompts = [family.prompt_ids(texts[i % len(texts)] + " " * (i // len(texts)), shape) for i in range(10)]
    tokens = family.tokens_for(shape)
    engine = dict(skip_tokenizer_init=True, enforce_eager=True, dtype="float32", seed=0, max_num_seqs=64,
                  block_size=32, max_model_len=max(map(len, prompts)) + tokens + 32)
    return Workload(folder, engine, prompts, {"equal": {"guidance_scale": 3.0, "same_length": True},
                                              "paired": {"guidance_scale": 3.0}},
                    tokens, DEFAULT_TOP_K, tokens - 8)


def extra_args(work: Workload, context: str, prompt: list[int]) -> dict:
    args = dict(work.contexts[context])
    if args.pop("same_length", False):
        args["negative_prompt_token_ids"] = list(prompt)
    return args


def sampling(work: Workload, context: str, prompt: list[int], max_tokens: int | None = None):
    from vllm import SamplingParams

    return SamplingParams(temperature=1.0, top_k=work.top_k, max_tokens=max_tokens or work.tokens, ignore_eos=True,
                          detokenize=False, extra_args=extra_args(work, context, prompt))


def timed(llm, work: Workload, batch: int, context: str) -> float:
    prompts = [work.prompts[i % len(work.prompts)] for i in range(batch)]
    params = [sampling(work, context, p) for p in prompts]
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - start


def kv_blocks_per_image(llm, work: Workload, batch: int, context: str) -> float:
    """KV blocks in use per image once each holds `work.kv_at` generated tokens."""
    engine = llm.llm_engine
    pool = engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    generated = work.kv_at
    for i in range(batch):
        prompt = work.prompts[i % len(work.prompts)]
        engine.add_request(f"kv-{i}", {"prompt_token_ids": prompt}, sampling(work, context, prompt, generated + 1))
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
    ap.add_argument("--model", type=Path, default=DEFAULT_OUT, help="a digit-model folder (the model or its twin)")
    ap.add_argument("--family", choices=["digits", "emu3"], default="digits",
                    help="emu3: the tiny real-shaped Emu3 folder (--model unused), 64 px images")
    ap.add_argument("--dtype", default="auto", help="digits only (the Emu3 folder runs in float32)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/paired_guidance.json"))
    args = ap.parse_args()
    started = provenance()

    work = emu3() if args.family == "emu3" else digits(args.model)
    if args.family == "digits":
        work.engine["dtype"] = args.dtype
    engines = {layout: LLM(str(work.folder), **work.engine, **kw) for layout, kw in LAYOUTS.items()}
    block_bytes = {layout: kv_bytes_per_block(llm) for layout, llm in engines.items()}
    results = {
        "model": args.family if args.family != "digits" else str(args.model), "tokens_per_image": work.tokens,
        "block_size": work.engine["block_size"], "kv_bytes_per_block": block_bytes,
        "baseline": "/".join(BASELINE), "batches": {}, "provenance": started,
    }
    for batch in args.batches:
        rounds = []
        for i in range(args.repeats + 1):  # the first round warms up
            order = CASES if i % 2 else CASES[::-1]  # no case always first after the one before
            r = {f"{lay}/{ctx}": timed(engines[lay], work, batch, ctx) for lay, ctx in order}
            if i:
                rounds.append(r)
        row = {"rounds_s": rounds}
        base = "/".join(BASELINE)
        for lay, ctx in CASES:
            case = f"{lay}/{ctx}"
            blocks = kv_blocks_per_image(engines[lay], work, batch, ctx)
            row[case] = {
                "ms_per_pass": 1e3 * statistics.median(r[case] for r in rounds) / work.tokens,
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
