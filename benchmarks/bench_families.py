"""Passes per image with SJD++ on the tiny real-shaped folders of the image families: Emu3
(tests/tiny_emu3.py: Emu3-Gen's vocabulary, ids, codebook and grid) and Lumina-mGPT
(tests/tiny_lumina.py: Lumina-mGPT-7B-768's), random weights, sharpened; both run paired.

    python benchmarks/bench_families.py [--family emu3|lumina] [--images 16] [--size 64] [--rounds 3]
                                        [--out FILE]

Seeded images of size x size px at scale 3 (Emu3: with its documented negative prompt; Lumina-mGPT:
its image header, the family's rule) and the family's top-k, one engine with SJD++ (k = 16, full
windows: draft_token_budget null, the folder's defaults: fresh codes from the row above, each
request's row width) and one without; passes per image are its tokens minus its accepted drafts
(vLLM's per-request speculative metrics).  The seeded images of both engines must be the same
tokens (the position-keyed race), which the script checks; each engine's wall time for the batch
is measured after a warm-up, with a third engine on the server's default windows ("auto": the
goodput controller).  "auto"'s first batch pays for what the controller is still learning after
the warm-up (its first choices of drafted windows); then plain and the settled "auto" take turns
for --rounds rounds (medians: a single batch of each, minutes apart, scattered by 30% and more
on a 2-core machine).  A random model's Jacobi
trajectories say little about trained weights: this measures the path, not the speed-up a real
checkpoint would get.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from vllm_sjdpp.provenance import provenance

for key, value in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(key, value)
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

ENGINE = dict(skip_tokenizer_init=True, enforce_eager=True, max_model_len=1024, max_num_seqs=4,
              max_num_batched_tokens=256, dtype="float32", seed=0)
PROMPTS = ["a red fox in the snow", "two boats at dawn", "a tree on a hill", "a city at night"]


def run(llm, prompts, negatives, tokens: int, top_k: int) -> list[tuple[list[int], int]]:
    from vllm import SamplingParams

    params = [
        SamplingParams(temperature=1.0, top_k=top_k, max_tokens=tokens, ignore_eos=True, detokenize=False, seed=i,
                       extra_args={"guidance_scale": 3.0, **({} if n is None else {"negative_prompt_token_ids": n})})
        for i, n in enumerate(negatives)
    ]
    out = []
    for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False):
        completion = o.outputs[0]
        metrics = completion.spec_decode_metrics
        accepted = sum(j * c for j, c in enumerate(metrics.histogram)) if metrics is not None else 0
        out.append((list(completion.token_ids), len(completion.token_ids) - accepted))
    return out


def tiny_folder(name: str):
    """(folder, family, the negative prompt's text or None: the family's rule, top-k)."""
    root = Path(tempfile.mkdtemp())
    if name == "emu3":
        from tiny_emu3 import build_tiny_emu3

        from vllm_sjdpp.families.emu3 import DEFAULT_TOP_K, NEGATIVE_PROMPT, Emu3Family

        folder = build_tiny_emu3(root / "emu3")
        return folder, Emu3Family(folder), NEGATIVE_PROMPT, DEFAULT_TOP_K
    from tiny_lumina import build_tiny_lumina

    from vllm_sjdpp.families.lumina import DEFAULT_TOP_K, LuminaFamily

    folder = build_tiny_lumina(root / "lumina")
    return folder, LuminaFamily(folder), None, DEFAULT_TOP_K


def main() -> None:
    from vllm import LLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["emu3", "lumina"], default="emu3")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--size", type=int, default=64, help="pixels per side (Emu3: a multiple of 8; Lumina-mGPT: of 32)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of plain and the settled 'auto', one batch each")
    ap.add_argument("--out", type=Path, help="default: benchmarks/results/<family>_passes.json")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    out_path = args.out or Path(f"benchmarks/results/{args.family}_passes.json")
    started = provenance()

    folder, family, negative_text, top_k = tiny_folder(args.family)
    size = (args.size, args.size)
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(args.images)]
    prompts = [family.prompt_ids(t, size) for t in texts]
    negatives = [None if negative_text is None else family.prompt_ids(negative_text, size)] * args.images
    tokens = family.tokens_for(size)
    full = {"method": "sjdpp", "num_speculative_tokens": 16, "draft_token_budget": None}
    engines = {
        "plain": LLM(str(folder), **ENGINE), "sjdpp": LLM(str(folder), speculative_config=full, **ENGINE),
        "auto": LLM(str(folder), speculative_config={"method": "sjdpp"}, **ENGINE),  # the server's default
    }
    for llm in engines.values():
        run(llm, prompts[:2], negatives[:2], tokens, top_k)  # warm-up
    batches: dict[str, list] = {"sjdpp": [], "auto_first_batch": [], "plain": [], "auto": []}

    def timed(label: str) -> float:
        start = time.perf_counter()
        batches[label].append(run(engines[label.removesuffix("_first_batch")], prompts, negatives, tokens, top_k))
        return time.perf_counter() - start

    # "auto"'s first batch pays for what the controller is still learning; then plain and
    # the settled "auto" take turns, the one that goes first alternating, so drift hits both alike.
    seconds = {"sjdpp": timed("sjdpp"), "auto_first_batch": timed("auto_first_batch")}
    rounds = []
    for r in range(args.rounds):
        order = ("plain", "auto") if r % 2 == 0 else ("auto", "plain")
        rounds.append(dict(zip(order, (timed(order[0]), timed(order[1])))))
    seconds["plain"] = statistics.median(t["plain"] for t in rounds)
    seconds["auto"] = statistics.median(t["auto"] for t in rounds)
    auto_over_plain = statistics.median(t["auto"] / t["plain"] for t in rounds)
    plain = batches["plain"][0]

    def identical(*labels: str) -> int:
        """Images whose tokens equal plain's first batch's in every batch of `labels`."""
        runs = [b for label in labels for b in batches[label]]
        return sum(all(b[i][0] == plain[i][0] for b in runs) for i in range(args.images))

    def passes(label: str) -> float:
        return statistics.mean(p for b in batches[label] for _, p in b)

    rule = family.unconditional_rule(family.config, {})
    negative_tokens = len(negatives[0]) if negatives[0] is not None else len(rule.apply(prompts[0]))
    sjdpp_passes = passes("sjdpp")
    result = {
        "family": args.family, "size_px": args.size, "tokens_per_image": tokens, "images": args.images,
        "prompt_tokens": len(prompts[0]), "negative_prompt_tokens": negative_tokens,
        "plain_passes_per_image": passes("plain"), "sjdpp_passes_per_image": sjdpp_passes,
        "fewer_passes": tokens / sjdpp_passes, "identical_images": identical("sjdpp"),
        # Wall time of the whole batch (max_num_seqs 4 in flight), each engine after a warm-up:
        # "sjdpp" (full windows) and "auto_first_batch" (the controller still learning) once,
        # "plain" and the settled "auto" medians over the rounds; "auto_over_plain_median": the
        # median of the rounds' ratios, what "speedup" gives for "auto".
        "seconds": seconds,
        "speedup": {**{k: seconds["plain"] / v for k, v in seconds.items()}, "auto": 1 / auto_over_plain},
        "rounds": rounds, "auto_over_plain_median": auto_over_plain,
        "auto_first_batch_passes_per_image": passes("auto_first_batch"), "auto_passes_per_image": passes("auto"),
        "auto_identical_images": identical("auto_first_batch", "auto"), "plain_repeated_images": identical("plain"),
        "provenance": started,
    }
    print(f"{args.family}: {args.images} images of {args.size}x{args.size} px ({tokens} tokens): plain "
          f"{result['plain_passes_per_image']:.1f} passes, SJD++ {sjdpp_passes:.1f} ({tokens / sjdpp_passes:.2f}x "
          f"fewer); {result['identical_images']}/{args.images} identical to plain; wall time "
          + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
          + f"; auto / plain {auto_over_plain:.2f}x (median of {args.rounds} rounds), its passes per image "
          f"{result['auto_first_batch_passes_per_image']:.1f} (first batch) and {result['auto_passes_per_image']:.1f}, "
          f"{result['auto_identical_images']}/{args.images} identical to plain in every batch")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
