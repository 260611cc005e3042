"""Gumbel-coupled verification against the ratio test with maximal-coupling reuse: forward passes
per image and acceptance by window position, on the same engine, prompts and windows.

    python benchmarks/bench_verification.py [--images 60] [--out benchmarks/results/verification]

Models: the digit model (guided at its folder's scale, k = 32, fresh tokens from the row above:
its folder's SJD++ defaults) and the small tiny Janus of the tests (random weights, guidance 2,
k = 6; tests/tiny_janus.py).  Full windows (draft_token_budget null), so that passes measure
the verifier, not this machine's load.  Each image is generated once per verification with the
same seed; passes = tokens - accepted drafts, from vLLM's spec-decode counters.
The rule the product follows (issue 23): Gumbel coupling becomes every request's verification
if its passes per image are within 10% of the ratio test's.  Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_e2e  # noqa: E402  (sets the in-process engine environment first)
from vllm_sjdpp.provenance import provenance  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from vllm_sjdpp.digits.tokens import GENERATED_LENGTH, prompt_ids  # noqa: E402
from vllm_sjdpp.digits.train import DEFAULT_OUT  # noqa: E402
from vllm_sjdpp.engine.runtime import runtime_of  # noqa: E402

VERIFICATIONS = ("gumbel", "ratio")


def measure(llm, prompts: list[list[int]], max_tokens: int) -> dict:
    out = {}
    for verification in VERIFICATIONS:
        params = []
        for i in range(len(prompts)):
            p = llm.get_default_sampling_params()
            p.max_tokens, p.seed, p.ignore_eos = max_tokens, 1000 + i, True
            p.extra_args = {"sjdpp_verification": verification}
            params.append(p)
        before, per_pos_before = bench_e2e.counters(llm)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        after, per_pos_after = bench_e2e.counters(llm)
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        accepted = after - before
        per_pos = [a - b for a, b in zip(per_pos_after, per_pos_before + [0.0] * len(per_pos_after))]
        passes = tokens - accepted
        out[verification] = {
            "passes_per_image": passes / len(prompts),
            "tokens_per_pass": tokens / passes,
            # acceptance at window slot j: drafts accepted there per pass
            "accepted_per_pass_by_slot": [x / passes for x in per_pos],
        }
    out["gumbel_over_ratio_passes"] = out["gumbel"]["passes_per_image"] / out["ratio"]["passes_per_image"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/verification"))
    args = ap.parse_args()
    started = provenance()
    from vllm import LLM

    from tiny_janus import SMALL, build_tiny_janus
    from vllm_sjdpp import families

    engine = dict(enforce_eager=True, seed=0, skip_tokenizer_init=True, disable_log_stats=False)
    results = {}
    llm = LLM(str(DEFAULT_OUT), speculative_config={"method": "sjdpp", "draft_token_budget": None},
              max_model_len=GENERATED_LENGTH + 64, **engine)
    assert runtime_of(llm).config.draft_token_budget is None
    digits = [prompt_ids(i % 10) for i in range(args.images)]
    results["digits (guided, k=32, init above)"] = measure(llm, digits, GENERATED_LENGTH)
    del llm

    folder = build_tiny_janus(Path(tempfile.mkdtemp()) / "janus")
    family = families.load(folder)
    texts = ["a red dog under the sun", "the big green tree", "a small blue house under the rain", "a cat"]
    llm = LLM(str(folder), speculative_config={"method": "sjdpp", "num_speculative_tokens": 6, "draft_token_budget": None},
              max_model_len=64 + SMALL.tokens, **engine)
    janus = [family.prompt_ids(texts[i % len(texts)]) for i in range(args.images)]
    results["tiny Janus (small, guidance 2, k=6)"] = measure(llm, janus, SMALL.tokens)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    # One key per model, and "provenance" beside them.
    Path(f"{args.out}.json").write_text(json.dumps({**results, "provenance": started}, indent=1))
    lines = [
        f"Passes per image, {args.images} seeded images per model and verification, full windows.",
        "",
        "| model | Gumbel coupling | ratio test (maximal coupling) | Gumbel / ratio | accepted per pass, slots 1-4 (Gumbel / ratio) |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        slots = " / ".join(
            ", ".join(f"{x:.2f}" for x in r[v]["accepted_per_pass_by_slot"][:4]) for v in VERIFICATIONS
        )
        lines.append(
            f"| {name} | {r['gumbel']['passes_per_image']:.1f} | {r['ratio']['passes_per_image']:.1f} | "
            f"{r['gumbel_over_ratio_passes']:.3f} | {slots} |"
        )
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    worst = max(r["gumbel_over_ratio_passes"] for r in results.values())
    print(f"worst Gumbel / ratio passes: {worst:.3f} (within 10%: {worst <= 1.10})")


if __name__ == "__main__":
    main()
