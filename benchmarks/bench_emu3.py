"""Passes per image with SJD++ on the tiny Emu3 (tests/tiny_emu3.py: Emu3-Gen's vocabulary, ids,
codebook and grid; random weights, sharpened), the grid path with a paired negative prompt.

    python benchmarks/bench_emu3.py [--images 16] [--size 64] [--out benchmarks/results/emu3_passes.json]

Seeded images of size x size px with Emu3's documented negative prompt at scale 3, one engine with
SJD++ (k = 16, full windows: draft_token_budget null, the folder's defaults: fresh visual tokens
from the row above, each request's row width) and one without; passes per image are its tokens
minus its accepted drafts (vLLM's per-request speculative metrics).  The seeded images of both
engines must be the same tokens (the position-keyed race), which the script checks.  A random
model's Jacobi trajectories say little about trained weights: this measures the path, not the
speed-up Emu3-Gen would get.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

for key, value in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(key, value)
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

ENGINE = dict(skip_tokenizer_init=True, enforce_eager=True, max_model_len=1024, max_num_seqs=4,
              max_num_batched_tokens=256, dtype="float32", seed=0)
PROMPTS = ["a red fox in the snow", "two boats at dawn", "a tree on a hill", "a city at night"]


def run(llm, prompts, negatives, tokens: int) -> list[tuple[list[int], int]]:
    from vllm import SamplingParams

    params = [
        SamplingParams(temperature=1.0, top_k=2048, max_tokens=tokens, ignore_eos=True, detokenize=False, seed=i,
                       extra_args={"guidance_scale": 3.0, "negative_prompt_token_ids": n})
        for i, n in enumerate(negatives)
    ]
    out = []
    for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False):
        completion = o.outputs[0]
        metrics = completion.spec_decode_metrics
        accepted = sum(j * c for j, c in enumerate(metrics.histogram)) if metrics is not None else 0
        out.append((list(completion.token_ids), len(completion.token_ids) - accepted))
    return out


def main() -> None:
    from tiny_emu3 import build_tiny_emu3
    from vllm import LLM

    from vllm_sjdpp.families.emu3 import NEGATIVE_PROMPT, Emu3Family

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--size", type=int, default=64, help="pixels per side (a multiple of 8)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/emu3_passes.json"))
    args = ap.parse_args()

    folder = build_tiny_emu3(Path(tempfile.mkdtemp()) / "emu3")
    family = Emu3Family(folder)
    size = (args.size, args.size)
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(args.images)]
    prompts = [family.prompt_ids(t, size) for t in texts]
    negatives = [family.prompt_ids(NEGATIVE_PROMPT, size)] * args.images
    tokens = family.tokens_for(size)
    plain = run(LLM(str(folder), **ENGINE), prompts, negatives, tokens)
    spec = {"method": "sjdpp", "num_speculative_tokens": 16, "draft_token_budget": None}
    sjdpp = run(LLM(str(folder), speculative_config=spec, **ENGINE), prompts, negatives, tokens)
    same = sum(a == b for (a, _), (b, _) in zip(plain, sjdpp))
    passes = sum(p for _, p in sjdpp) / args.images
    result = {
        "size_px": args.size, "tokens_per_image": tokens, "images": args.images,
        "prompt_tokens": len(prompts[0]), "negative_prompt_tokens": len(negatives[0]),
        "plain_passes_per_image": sum(p for _, p in plain) / args.images,
        "sjdpp_passes_per_image": passes, "fewer_passes": tokens / passes, "identical_images": same,
    }
    print(f"{args.images} images of {args.size}x{args.size} px ({tokens} tokens): plain {result['plain_passes_per_image']:.1f} "
          f"passes, SJD++ {passes:.1f} ({tokens / passes:.2f}x fewer); {same}/{args.images} identical to plain")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
