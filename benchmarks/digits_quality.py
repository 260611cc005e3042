"""Image quality of the bundled digit model: plain decoding against SJD++, with the noise floor.

    python benchmarks/digits_quality.py [--per-digit 30] [--plain-runs 6] [--sjdpp-runs 6]
                                        [--out benchmarks/results/digits_quality.json]

Same prompts for every run ("a handwritten 0..9", --per-digit each), one seed set per run.
Plain decoding runs --plain-runs times with different seeds: their spread is the noise floor
(draws of one distribution).  SJD++ (the defaults: init="above" from the model folder, k = 32) runs --sjdpp-runs times with the
first plain runs' seeds.  For each run: the class accuracy and the Frechet distance to the real
held-out digits in the classifier's feature space (vllm_sjdpp.digits.quality).  SJD++ is exact,
so its runs must sit within the plain runs' spread (reported as z = (SJD++ mean - plain mean) /
plain standard deviation); they are not expected to equal any one plain run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

for key, value in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(key, value)

from vllm_sjdpp.digits import quality  # noqa: E402
from vllm_sjdpp.digits.tokens import GENERATED_LENGTH, ids_to_image, prompt_ids, to_png  # noqa: E402
from vllm_sjdpp.digits.train import DEFAULT_OUT  # noqa: E402
from vllm_sjdpp.digits.vq import Codebook  # noqa: E402

ENGINE = dict(enforce_eager=True, max_model_len=GENERATED_LENGTH + 64, seed=0, max_num_seqs=128)


def run(llm, per_digit: int, seed: int, codebook: Codebook) -> tuple[list, list[int], float]:
    import warnings

    labels = [d for d in range(10) for _ in range(per_digit)]
    defaults = llm.get_default_sampling_params()  # the model's generation_config: T=1, its top-k
    params = []
    for i in range(len(labels)):
        p = defaults.clone()
        p.max_tokens, p.seed = GENERATED_LENGTH, seed * 100_000 + i
        params.append(p)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": prompt_ids(d)} for d in labels], params, use_tqdm=True)
    wall = time.perf_counter() - start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # malformed streams are drawn best-effort and counted
        images = [ids_to_image(o.outputs[0].token_ids, codebook=codebook) for o in outs]
    return images, labels, wall


def main() -> None:
    from vllm import LLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-digit", type=int, default=30)
    ap.add_argument("--plain-runs", type=int, default=6)
    ap.add_argument("--sjdpp-runs", type=int, default=6)
    ap.add_argument("--model", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/digits_quality.json"))
    args = ap.parse_args()
    if args.plain_runs < 2 or args.sjdpp_runs < 1 or args.per_digit < 1:
        ap.error("need --plain-runs >= 2 (their spread is the noise floor), --sjdpp-runs >= 1, --per-digit >= 1")

    judge = quality.judge()
    real, _ = quality.real_images(held_out=True)
    codebook = Codebook.load(args.model)  # the model's own image tokenizer
    plain = LLM(str(args.model), **ENGINE)
    sjdpp = LLM(str(args.model), speculative_config="sjdpp", **ENGINE)
    runs = {f"plain seed {s}": run(plain, args.per_digit, s, codebook) for s in range(1, args.plain_runs + 1)}
    runs |= {f"SJD++ seed {s}": run(sjdpp, args.per_digit, s, codebook) for s in range(1, args.sjdpp_runs + 1)}
    results = {"classifier_held_out_accuracy": judge.held_out_accuracy, "per_digit": args.per_digit, "runs": {}}
    print(f"classifier held-out accuracy on real digits: {judge.held_out_accuracy:.3f}")
    print(f"{'run':<14} {'class acc':>9} {'FD to real':>10} {'wall s':>7}")
    for name, (images, labels, wall) in runs.items():
        acc, fd = judge.accuracy(images, labels), judge.frechet_distance(images, real)
        results["runs"][name] = {"class_accuracy": acc, "frechet_distance": fd, "wall_s": wall}
        print(f"{name:<14} {acc:>9.3f} {fd:>10.2f} {wall:>7.1f}")
    results["summary"] = {}
    for metric in ("class_accuracy", "frechet_distance"):
        by_mode = {
            mode: np.array([r[metric] for name, r in results["runs"].items() if name.startswith(mode)])
            for mode in ("plain", "SJD++")
        }
        plain_std = float(by_mode["plain"].std(ddof=1))
        z = float((by_mode["SJD++"].mean() - by_mode["plain"].mean()) / plain_std)
        results["summary"][metric] = {
            "plain_mean": float(by_mode["plain"].mean()), "plain_std": plain_std,
            "sjdpp_mean": float(by_mode["SJD++"].mean()), "z": z,
        }
        print(f"{metric}: plain {by_mode['plain'].mean():.3f} +- {plain_std:.3f} (std over {len(by_mode['plain'])} runs), "
              f"SJD++ {by_mode['SJD++'].mean():.3f} (z = {z:+.2f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    grid = [im for name in ("SJD++ seed 1", "plain seed 1") for im in runs[name][0][:: args.per_digit]]
    to_png(grid, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} (one image per digit: SJD++ row, plain row)")


if __name__ == "__main__":
    main()
