"""SJD++ with tensor parallelism 2 on CPU (vLLM's CPU build, one worker per core), against TP 1.

    VLLM_CPU_OMP_THREADS_BIND="0|1" python benchmarks/check_tp2.py [--out benchmarks/results/tp2.json]

(Without the binding vLLM 0.32's CPU backend refuses to start: "Not enough allowed NUMA nodes to
bind threads of 2 local CPUWorkers".)  On a tiny Llama built here: greedy SJD++ at TP 2 must be
token-identical to TP 1, and 3000 sampled sequences (temperature 1, top-k 8, 5 tokens) at TP 2
must match plain TP 1 sampling (per-position and adjacent-pair chi-square, Bonferroni).
Each engine runs in its own process.  Writes the verdict with its provenance to --out; exits
non-zero if either check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).parents[1]
CHILD = "--child"  # argv of an engine's own process: --child model tp sjdpp out
PROMPTS = [[2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14], [20]]
SAMPLES, LENGTH = 3000, 5


def run(model: str, tp: int, sjdpp: bool, out: Path) -> None:
    from vllm import LLM, SamplingParams

    kw = dict(skip_tokenizer_init=True, enforce_eager=True, max_model_len=256, dtype="float32", seed=0)
    if sjdpp:
        kw["speculative_config"] = {"method": "sjdpp", "num_speculative_tokens": 6}
    if tp > 1:
        kw.update(tensor_parallel_size=tp, distributed_executor_backend="mp")
    llm = LLM(model, **kw)
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, detokenize=False)
    sampled = SamplingParams(temperature=1.0, top_k=8, max_tokens=LENGTH, ignore_eos=True, detokenize=False)

    def tokens(prompts, params):
        return [list(o.outputs[0].token_ids) for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]

    out.write_text(json.dumps({"greedy": tokens(PROMPTS, greedy), "samples": tokens([[2, 3, 4]] * SAMPLES, sampled)}))


def main() -> None:
    if sys.argv[1:2] == [CHILD]:
        run(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", Path(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/tp2.json")
    args = ap.parse_args()
    import numpy as np

    from vllm_sjdpp.provenance import provenance

    started = provenance()
    sys.path.insert(0, str(ROOT / "tests"))
    from stats import ALPHA, position_pair_pvalues
    from tiny_llama import build_tiny_llama

    tmp = Path(tempfile.mkdtemp(prefix="sjdpp-tp2-"))
    model = str(build_tiny_llama(tmp / "tiny-llama"))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    results = {}
    for name, tp, sjdpp in (("plain TP 1", 1, False), ("SJD++ TP 1", 1, True), ("SJD++ TP 2", 2, True)):
        out = tmp / f"{tp}-{int(sjdpp)}.json"
        subprocess.run([sys.executable, __file__, CHILD, model, str(tp), str(int(sjdpp)), str(out)], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        results[name] = json.loads(out.read_text())
    same_greedy = results["SJD++ TP 2"]["greedy"] == results["SJD++ TP 1"]["greedy"] == results["plain TP 1"]["greedy"]
    pvalues = position_pair_pvalues(np.array(results["plain TP 1"]["samples"]), np.array(results["SJD++ TP 2"]["samples"]), 48)
    threshold = ALPHA / len(pvalues)
    print(f"greedy SJD++ TP 2 == TP 1 == plain: {same_greedy}")
    print(f"sampled SJD++ TP 2 vs plain TP 1: smallest p = {min(pvalues):.3g} over {len(pvalues)} tests "
          f"(pass: > {threshold:.2g})")
    passed = bool(same_greedy and min(pvalues) > threshold)
    result = {"greedy_identical": bool(same_greedy), "greedy_prompts": len(PROMPTS), "samples": SAMPLES,
              "sample_tokens": LENGTH, "smallest_p": float(min(pvalues)), "tests": len(pvalues),
              "threshold": threshold, "passed": passed, "provenance": started}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    if not passed:
        sys.exit(1)


if __name__ == "__main__":
    main()
