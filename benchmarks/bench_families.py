"""Passes per image with SJD++ on the tiny real-shaped folders of the image families: Emu3
(tests/tiny_emu3.py: Emu3-Gen's vocabulary, ids, codebook and grid) and Lumina-mGPT
(tests/tiny_lumina.py: Lumina-mGPT-7B-768's), random weights, sharpened; both run paired.

    python benchmarks/bench_families.py [--family emu3|lumina] [--images 16] [--size 64] [--rounds 3] [--out FILE]

Seeded images of size x size px at scale 3 (Emu3: with its documented negative prompt; Lumina-mGPT:
its image header, the family's rule) and the family's top-k, one engine with SJD++ (k = 16, full
windows: draft_token_budget null, the folder's defaults: fresh codes from the row above, each
request's row width) and one without; passes per image are its tokens minus its accepted drafts
(vLLM's per-request speculative metrics).  The seeded images of both engines must be the same
tokens (the position-keyed race), which the script checks; each engine's wall time for the batch
is measured after a warm-up, with a third engine on the server's default windows ("auto": the
goodput controller).  "auto"'s first batch pays for the controller's trials of drafted windows;
then plain and the settled "auto" take turns for --rounds rounds (medians; one engine after the
other instead measured the last one up to 1.75x slower, in a process holding three).  A random model's Jacobi trajectories
say little about trained weights: this measures the path, not the speed-up a real checkpoint
would get.
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
    def timed(name: str) -> float:
        start = time.perf_counter()
        outputs[name] = run(engines[name], prompts, negatives, tokens, top_k)
        return time.perf_counter() - start

    outputs = {}
    for llm in engines.values():
        run(llm, prompts[:2], negatives[:2], tokens, top_k)  # warm-up
    # "auto"'s first batch pays for the controller's trials of drafted windows; then plain and
    # the settled "auto" take turns, round by round, so drift on the machine hits both alike.
    seconds = {"sjdpp": timed("sjdpp"), "auto_first_batch": timed("auto")}
    rounds = [(timed("plain"), timed("auto")) for _ in range(args.rounds)]
    seconds["plain"] = statistics.median(p for p, _ in rounds)
    seconds["auto"] = statistics.median(a for _, a in rounds)
    auto_over_plain = statistics.median(a / p for p, a in rounds)
    plain, sjdpp = outputs["plain"], outputs["sjdpp"]
    same = sum(a == b for (a, _), (b, _) in zip(plain, sjdpp))
    passes = sum(p for _, p in sjdpp) / args.images
    rule = family.unconditional_rule(family.config, {})
    negative_tokens = len(negatives[0]) if negatives[0] is not None else len(rule.apply(prompts[0]))
    result = {
        "family": args.family, "size_px": args.size, "tokens_per_image": tokens, "images": args.images,
        "prompt_tokens": len(prompts[0]), "negative_prompt_tokens": negative_tokens,
        "plain_passes_per_image": sum(p for _, p in plain) / args.images,
        "sjdpp_passes_per_image": passes, "fewer_passes": tokens / passes, "identical_images": same,
        # Wall time of the whole batch (max_num_seqs 4 in flight), each engine after a warm-up;
        # "auto": the server's default windows (the goodput controller) once settled, and
        # "plain": medians over the rounds; "auto_first_batch": with the controller's trials.
        "seconds": seconds, "speedup": {k: seconds["plain"] / v for k, v in seconds.items()},
        "rounds": [{"plain": p, "auto": a} for p, a in rounds], "auto_over_plain_median": auto_over_plain,
        "auto_identical_images": sum(a == b for (a, _), (b, _) in zip(plain, outputs["auto"])),
        "provenance": started,
    }
    print(f"{args.family}: {args.images} images of {args.size}x{args.size} px ({tokens} tokens): plain "
          f"{result['plain_passes_per_image']:.1f} passes, SJD++ {passes:.1f} ({tokens / passes:.2f}x fewer); "
          f"{same}/{args.images} identical to plain; wall time " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
          + f"; auto / plain {auto_over_plain:.2f}x (median of {args.rounds} rounds)")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
