"""Image quality of the bundled digit model: plain decoding against SJD++, with the noise floor.

    python benchmarks/digits_quality.py [--per-digit 20] [--out benchmarks/results/digits_quality.json]

Same prompts for every run ("a handwritten 0..9", --per-digit each). Runs: plain decoding with
seed A, plain decoding with seed B (the noise floor: two draws of the same distribution), SJD++
with seed A. For each, the class accuracy and the Frechet distance to the real held-out digits
in the classifier's feature space (vllm_sjdpp.digits.quality). SJD++ is exact, so its numbers
must sit within the noise floor; they are not expected to equal plain-seed-A's.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

for key, value in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(key, value)

from vllm_sjdpp.digits import quality  # noqa: E402
from vllm_sjdpp.digits.tokens import GENERATED_LENGTH, ids_to_image, prompt_ids, to_png  # noqa: E402
from vllm_sjdpp.digits.train import DEFAULT_OUT  # noqa: E402

ENGINE = dict(enforce_eager=True, max_model_len=GENERATED_LENGTH + 64, seed=0, max_num_seqs=256)


def run(llm, per_digit: int, seed: int) -> tuple[list, list[int], float]:
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
        images = [ids_to_image(o.outputs[0].token_ids) for o in outs]
    return images, labels, wall


def main() -> None:
    from vllm import LLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-digit", type=int, default=20)
    ap.add_argument("--model", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/digits_quality.json"))
    args = ap.parse_args()

    judge = quality.judge()
    real, _ = quality.real_images(held_out=True)
    plain = LLM(str(args.model), **ENGINE)
    sjdpp = LLM(str(args.model), speculative_config={"method": "sjdpp", "init": "above"}, **ENGINE)
    runs = {
        "plain seed A": run(plain, args.per_digit, 1),
        "plain seed B": run(plain, args.per_digit, 2),
        "SJD++ seed A": run(sjdpp, args.per_digit, 1),
    }
    results = {"classifier_held_out_accuracy": judge.held_out_accuracy, "per_digit": args.per_digit, "runs": {}}
    print(f"classifier held-out accuracy on real digits: {judge.held_out_accuracy:.3f}")
    print(f"{'run':<14} {'class acc':>9} {'FD to real':>10} {'wall s':>7}")
    for name, (images, labels, wall) in runs.items():
        acc, fd = judge.accuracy(images, labels), judge.frechet_distance(images, real)
        results["runs"][name] = {"class_accuracy": acc, "frechet_distance": fd, "wall_s": wall}
        print(f"{name:<14} {acc:>9.3f} {fd:>10.2f} {wall:>7.1f}")
    floor_acc = abs(results["runs"]["plain seed A"]["class_accuracy"] - results["runs"]["plain seed B"]["class_accuracy"])
    floor_fd = abs(results["runs"]["plain seed A"]["frechet_distance"] - results["runs"]["plain seed B"]["frechet_distance"])
    results["noise_floor"] = {"class_accuracy": floor_acc, "frechet_distance": floor_fd}
    print(f"noise floor (|plain A - plain B|): accuracy {floor_acc:.3f}, FD {floor_fd:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    grid = [im for name in ("SJD++ seed A", "plain seed A") for im in runs[name][0][:: args.per_digit]]
    to_png(grid, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} (one image per digit: SJD++ row, plain row)")


if __name__ == "__main__":
    main()
