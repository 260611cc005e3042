"""Image quality of the bundled digit model against the guidance scale: plain decoding against
SJD++, with the noise floor, and forward passes per image.

    python benchmarks/digits_quality.py [--scales 1,1.5,2,3,5] [--per-digit 30] [--plain-runs 6]
                                        [--sjdpp-runs 3] [--out benchmarks/results/digits_quality.json]

Same prompts for every run ("a handwritten 0..9", --per-digit each), one seed set per run, the
model's sampling defaults (T = 1, its top-k) and classifier-free guidance at each scale.  Plain
decoding (guided, no speculation) runs --plain-runs times with different seeds: their spread is
the noise floor (draws of one distribution).  SJD++ (the defaults: init="above" from the model
folder, k = 32, full windows: no draft-token budget) runs --sjdpp-runs times with the first
plain runs' seeds.  For each run: the
class accuracy and the Frechet distance to the real held-out digits in the classifier's feature
space (vllm_sjdpp.digits.quality).  SJD++ is exact, so its runs must sit within the plain runs'
spread (z = (SJD++ mean - plain mean) / plain standard deviation); they are not expected to equal
any one plain run.  Passes per image: plain decoding makes one per token; SJD++ makes tokens minus
accepted drafts (vLLM's spec-decode counter).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from vllm_sjdpp.provenance import provenance

for key, value in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(key, value)

from vllm_sjdpp.digits import quality  # noqa: E402
from vllm_sjdpp.digits.tokens import GENERATED_LENGTH, ids_to_image, prompt_ids, to_png  # noqa: E402
from vllm_sjdpp.digits.train import DEFAULT_OUT  # noqa: E402
from vllm_sjdpp.digits.vq import Codebook  # noqa: E402

ENGINE = dict(enforce_eager=True, max_model_len=GENERATED_LENGTH + 64, seed=0, max_num_seqs=128)


def accepted_drafts(llm) -> float:
    """vLLM's counter of accepted drafts (0 for an engine without speculation)."""
    if llm.llm_engine.vllm_config.speculative_config is None:
        return 0.0
    return next(m.value for m in llm.get_metrics() if m.name == "vllm:spec_decode_num_accepted_tokens")


def run(llm, per_digit: int, seed: int, scale: float, codebook: Codebook) -> dict:
    """Images, labels, wall time and forward passes per image of one run."""
    import warnings

    labels = [d for d in range(10) for _ in range(per_digit)]
    defaults = llm.get_default_sampling_params()  # the model's generation_config: T=1, its top-k
    params = []
    for i in range(len(labels)):
        p = defaults.clone()
        p.max_tokens, p.seed = GENERATED_LENGTH, seed * 100_000 + i
        p.extra_args = {"guidance_scale": scale}
        params.append(p)
    accepted = accepted_drafts(llm)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": prompt_ids(d)} for d in labels], params, use_tqdm=True)
    wall = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # malformed streams are drawn best-effort and counted
        images = [ids_to_image(o.outputs[0].token_ids, codebook=codebook) for o in outs]
    passes = (tokens - (accepted_drafts(llm) - accepted)) / len(outs)
    return {"images": images, "labels": labels, "wall_s": wall, "passes_per_image": passes}


def summarise(runs: dict) -> dict:
    """Per metric: the plain runs' mean and spread, the SJD++ runs' mean; z for the quality
    metrics, and for passes how many times fewer SJD++ needs."""
    summary = {}
    for metric in ("class_accuracy", "frechet_distance", "passes_per_image"):
        by_mode = {
            mode: np.array([r[metric] for name, r in runs.items() if name.startswith(mode)])
            for mode in ("plain", "SJD++")
        }
        plain_mean, plain_std, sjdpp_mean = by_mode["plain"].mean(), by_mode["plain"].std(ddof=1), by_mode["SJD++"].mean()
        summary[metric] = {"plain_mean": float(plain_mean), "plain_std": float(plain_std), "sjdpp_mean": float(sjdpp_mean)}
        if metric == "passes_per_image":
            summary[metric]["fewer_than_plain"] = float(plain_mean / sjdpp_mean)
        else:
            summary[metric]["z"] = float((sjdpp_mean - plain_mean) / plain_std)
    return summary


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = sorted(results["scales"], key=float)
    x = [float(s) for s in scales]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, metric, label in zip(
        axes, ("class_accuracy", "frechet_distance", "passes_per_image"),
        ("class accuracy", "Frechet distance to real digits", "forward passes per image"),
    ):
        summary = [results["scales"][s]["summary"][metric] for s in scales]
        mean = np.array([m["plain_mean"] for m in summary])
        std = np.array([m["plain_std"] for m in summary])
        ax.fill_between(x, mean - 2 * std, mean + 2 * std, alpha=0.2, label="plain: ±2 std over seeds")
        ax.plot(x, mean, "o-", label="plain, mean")
        ax.plot(x, [m["sjdpp_mean"] for m in summary], "s--", label="SJD++, mean")
        ax.set_xlabel("guidance scale")
        ax.set_title(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Digit model with classifier-free guidance ({results['per_digit'] * 10} images per run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: dict) -> str:
    """The per-scale summary as a Markdown table (results/digits_quality.md)."""
    runs = {
        scale: " + ".join(str(sum(n.startswith(mode) for n in r["runs"])) for mode in ("plain", "SJD++"))
        for scale, r in results["scales"].items()
    }
    lines = [
        f"{results['per_digit'] * 10} images per run; plain: mean ± std over its seeds; z = (SJD++ mean − plain mean) / plain std.",
        "",
        "| scale | runs (plain + SJD++) | class acc, plain | class acc, SJD++ (z) | FD, plain | FD, SJD++ (z) | passes/image plain | passes/image SJD++ (x fewer) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for scale in sorted(results["scales"], key=float):
        m = results["scales"][scale]["summary"]
        acc, fd, passes = m["class_accuracy"], m["frechet_distance"], m["passes_per_image"]
        lines.append(
            f"| {float(scale):g} | {runs[scale]} | {acc['plain_mean']:.3f} ± {acc['plain_std']:.3f} | "
            f"{acc['sjdpp_mean']:.3f} ({acc['z']:+.2f}) | {fd['plain_mean']:.2f} ± {fd['plain_std']:.2f} | "
            f"{fd['sjdpp_mean']:.2f} ({fd['z']:+.2f}) | {passes['plain_mean']:.1f} | "
            f"{passes['sjdpp_mean']:.1f} ({passes['fewer_than_plain']:.2f}x) |"
        )
    return "\n".join(lines) + "\n"


def write_reports(results: dict, out: Path) -> None:
    """The JSON, the Markdown table and the plot beside it.  The JSON keeps the run's
    "provenance" (--report-only neither adds nor replaces one: the numbers are the run's)."""
    for scale in results["scales"].values():
        scale["summary"] = summarise(scale["runs"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(markdown(results))
    plot(results, out.with_name(out.stem + "_scales.png"))


def main() -> None:
    from vllm import LLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 1.5, 2.0, 3.0, 5.0])
    ap.add_argument("--per-digit", type=int, default=30)
    ap.add_argument("--plain-runs", type=int, default=6)
    ap.add_argument("--sjdpp-runs", type=int, default=3)
    ap.add_argument("--model", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--dtype", default="auto", help="vLLM's --dtype (auto: bfloat16 on this CPU)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/digits_quality.json"))
    ap.add_argument("--report-only", action="store_true", help="rewrite the table and plot from --out's JSON")
    args = ap.parse_args()
    if args.report_only:
        write_reports(json.loads(args.out.read_text()), args.out)
        return
    if args.plain_runs < 2 or args.sjdpp_runs < 1 or args.per_digit < 1 or min(args.scales) < 0:
        ap.error("need --plain-runs >= 2 (their spread is the noise floor), --sjdpp-runs >= 1, --per-digit >= 1, scales >= 0")

    started = provenance()
    judge = quality.judge()
    real, _ = quality.real_images(held_out=True)
    codebook = Codebook.load(args.model)  # the model's own image tokenizer
    engine = {**ENGINE, "dtype": args.dtype}
    plain = LLM(str(args.model), **engine)
    # Full windows (no draft-token budget): passes per image as the method gives them, not as a
    # budget shared by 100 requests in flight cuts them (the output is exact either way).
    sjdpp = LLM(str(args.model), speculative_config={"method": "sjdpp", "draft_token_budget": None},
                disable_log_stats=False, **engine)
    results = {"classifier_held_out_accuracy": judge.held_out_accuracy, "per_digit": args.per_digit, "scales": {},
               "provenance": started}
    print(f"classifier held-out accuracy on real digits: {judge.held_out_accuracy:.3f}")
    first_images = {}
    for scale in args.scales:
        runs = {f"plain seed {s}": run(plain, args.per_digit, s, scale, codebook) for s in range(1, args.plain_runs + 1)}
        runs |= {f"SJD++ seed {s}": run(sjdpp, args.per_digit, s, scale, codebook) for s in range(1, args.sjdpp_runs + 1)}
        first_images[scale] = [im for name in ("SJD++ seed 1", "plain seed 1") for im in runs[name]["images"][:: args.per_digit]]
        print(f"guidance scale {scale}:")
        print(f"  {'run':<14} {'class acc':>9} {'FD to real':>10} {'passes':>7} {'wall s':>7}")
        table = {}
        for name, r in runs.items():
            acc, fd = judge.accuracy(r["images"], r["labels"]), judge.frechet_distance(r["images"], real)
            table[name] = {"class_accuracy": acc, "frechet_distance": fd, "passes_per_image": r["passes_per_image"], "wall_s": r["wall_s"]}
            print(f"  {name:<14} {acc:>9.3f} {fd:>10.2f} {r['passes_per_image']:>7.1f} {r['wall_s']:>7.1f}")
        summary = summarise(table)
        for metric, m in summary.items():
            versus = f"{m['fewer_than_plain']:.2f}x fewer" if "fewer_than_plain" in m else f"z = {m['z']:+.2f}"
            print(f"  {metric}: plain {m['plain_mean']:.3f} +- {m['plain_std']:.3f}, SJD++ {m['sjdpp_mean']:.3f} ({versus})")
        results["scales"][str(scale)] = {"runs": table, "summary": summary}
    write_reports(results, args.out)
    # One image per digit and scale: an SJD++ row and a plain row per scale.
    to_png([im for scale in args.scales for im in first_images[scale]], args.out.with_suffix(".png"))
    print(f"wrote {args.out}, its .md table, {args.out.with_suffix('.png')} (per scale: an SJD++ row, a plain row) and the scale plot")


if __name__ == "__main__":
    main()
