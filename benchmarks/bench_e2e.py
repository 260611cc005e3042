"""End to end in vLLM: plain decoding against SJD and SJD++ on the same prompts and seeds.

    python benchmarks/bench_e2e.py [--quick] [--model DIR] [--out benchmarks/results/e2e]

One in-process engine without speculation (the baseline) and one with `sjdpp`; the SJD++ modes
are chosen per request, so every mode runs on the same engine, model and prompts: the default
verification (Gumbel coupling) at each init and window k, and the ratio test (speculative
sampling's min(1, p/q)) with each reuse of old drafts, where SJD (no reuse) and SJD++ differ (under
the coupling a draft is kept exactly when it wins the race, so reuse has nothing to choose).  For
each mode:
- forward passes per image (each pass commits its accepted drafts plus one token, so
  passes = tokens - accepted drafts, from vLLM's own spec-decode counters),
- latency per image at batch 1,
- throughput (images/s, tokens/s) with 1, 8, 32 and 64 concurrent requests,
- acceptance by window position,
- class accuracy and Frechet distance of the images (vllm_sjdpp.digits.quality).
Then the draft-token budget sweep: throughput of the default SJD++ mode against plain decoding
at 8, 32 and 64 concurrent requests for several server budgets (`draft_token_budget`), the data
behind the default budget.  Writes <out>.json, <out>.md (the tables), plots <out>_*.png, and
prints the tables.
--quick: fewer modes, sizes and budgets (about 5 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np

from vllm_sjdpp.provenance import provenance

for key, value in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(key, value)

from vllm_sjdpp.digits import quality  # noqa: E402
from vllm_sjdpp.digits.tokens import GENERATED_LENGTH, ids_to_image, prompt_ids  # noqa: E402
from vllm_sjdpp.digits.train import DEFAULT_OUT  # noqa: E402
from vllm_sjdpp.digits.vq import Codebook  # noqa: E402
from vllm_sjdpp.engine.runtime import runtime_of  # noqa: E402

MAX_WINDOW = 32


def mode_name(mode: dict | None) -> str:
    if mode is None:
        return "plain"
    window = f"init={mode['sjdpp_init']} k={mode['sjdpp_num_speculative_tokens']}"
    if mode["sjdpp_verification"] == "gumbel":
        return f"SJD++ {window}"
    label = "SJD (ratio test)" if mode["sjdpp_reuse"] == "none" else f"SJD++ ratio test, {mode['sjdpp_reuse']} reuse"
    return f"{label} {window}"


def counters(llm) -> tuple[float, list[float]]:
    accepted, per_pos = 0.0, []
    for m in llm.get_metrics():
        if m.name == "vllm:spec_decode_num_accepted_tokens":
            accepted = m.value
        elif m.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            per_pos = list(m.values)
    return accepted, per_pos


def generate(llm, mode: dict | None, digits: list[int], seed: int | None):
    """Returns (token lists, wall seconds, accepted drafts, accepted per position); image i gets
    seed + i (None: unseeded)."""
    defaults = llm.get_default_sampling_params()
    params = []
    for i in range(len(digits)):
        p = defaults.clone()
        p.max_tokens, p.seed = GENERATED_LENGTH, None if seed is None else seed + i
        p.extra_args = dict(mode) if mode else None
        params.append(p)
    accepted, per_pos = counters(llm)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": prompt_ids(d)} for d in digits], params, use_tqdm=False)
    wall = time.perf_counter() - start
    accepted_after, per_pos_after = counters(llm)
    per_pos_delta = [a - b for a, b in zip(per_pos_after, per_pos + [0.0] * len(per_pos_after))]
    return [list(o.outputs[0].token_ids) for o in outs], wall, accepted_after - accepted, per_pos_delta


def write_results(out: Path, result: dict, markdown, plot) -> None:
    """<out>.json, <out>.md (the tables, also printed) and <out>.png.  The JSON carries the
    result's "provenance" (this process's, unless the caller recorded it when the run began)."""
    result.setdefault("provenance", provenance())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    out.with_suffix(".md").write_text(table)
    plot(result, out.with_suffix(".png"))
    print(table)


def window_lengths(parser: argparse.ArgumentParser, text: str, longest: int) -> list[int]:
    """--windows "4,8,16,32" as sorted distinct lengths, each 1 to `longest`; else the parser's error."""
    try:
        windows = sorted({int(k) for k in text.split(",")})
    except ValueError:
        windows = []
    if not windows or windows[0] < 1 or windows[-1] > longest:
        parser.error(f"--windows: comma-separated lengths from 1 to {longest}, got {text!r}")
    return windows


def full_window_engine(model: str, window: int, dtype: str = "auto"):
    """An in-process SJD++ engine on the digit model whose requests each set their own window
    (`sjdpp_num_speculative_tokens`, up to `window`): no draft-token budget, the model's defaults
    otherwise; served in `dtype` (vLLM's)."""
    from vllm import LLM

    llm = LLM(model, speculative_config={"method": "sjdpp", "num_speculative_tokens": window},
              enforce_eager=True, max_model_len=GENERATED_LENGTH + 64, seed=0, max_num_seqs=64,
              disable_log_stats=False, dtype=dtype)
    runtime_of(llm).set_draft_token_budget(None)
    return llm


def served_dtype(llm) -> str:
    """The dtype an in-process engine serves in, as the results name it ("float32", "bfloat16")."""
    return str(llm.llm_engine.vllm_config.model_config.dtype).removeprefix("torch.")


def runtime_or_none(llm):
    """The in-process engine's SJD++ runtime, None for a plain engine."""
    try:
        return runtime_of(llm)
    except ValueError:
        return None


@contextlib.contextmanager
def draft_token_budget(llm, budget: int | None):
    """The server's draft-token budget set to `budget` for a while (no-op for a plain engine)."""
    runtime = runtime_or_none(llm)
    if runtime is None:
        yield
        return
    default = runtime.config.draft_token_budget
    runtime.set_draft_token_budget(budget)
    try:
        yield
    finally:
        runtime.set_draft_token_budget(default)


def paired_throughput(plain, llm, mode, concurrency: int, seed: int) -> dict:
    """`concurrency` images of `mode` in flight, timed right after plain decoding of the same
    prompts and seeds: the ratio is paired (this machine drifts by tens of percent)."""
    digits = [i % 10 for i in range(concurrency)]
    plain_wall = generate(plain, None, digits, seed)[1]
    tokens, wall, _, _ = generate(llm, mode, digits, seed)
    return {
        "images_per_s": concurrency / wall, "tokens_per_s": sum(map(len, tokens)) / wall,
        "plain_images_per_s": concurrency / plain_wall, "ratio_vs_plain": plain_wall / wall,
    }


def measure(llm, plain, mode, concurrencies, images_per_digit, judge, real, latency_repeats, codebook, seed=0) -> dict:
    from tqdm import tqdm

    row: dict = {"mode": mode_name(mode), "options": mode}
    # Quality and step compression on images_per_digit images of each digit, all at once, with
    # full windows (no draft-token budget): passes measure the method, not the batch size.
    digits = [d for d in range(10) for _ in range(images_per_digit)]
    with draft_token_budget(llm, None):
        tokens, wall, accepted, per_pos = generate(llm, mode, digits, seed)
    n_tokens = sum(len(t) for t in tokens)
    row["tokens_per_image"] = n_tokens / len(tokens)
    row["forward_passes_per_image"] = (n_tokens - accepted) / len(tokens)
    row["tokens_per_pass"] = n_tokens / max(n_tokens - accepted, 1)
    row["accepted_by_position"] = [a / len(tokens) for a in per_pos]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images = [ids_to_image(t, codebook=codebook) for t in tokens]
    row["class_accuracy"] = judge.accuracy(images, digits)
    row["frechet_distance"] = judge.frechet_distance(images, real)
    # Latency at batch 1, then throughput with C requests in flight; every timing right after a
    # plain one on the same prompts and seeds: the ratios are paired (this machine drifts).
    latencies, plain_latencies = [], []
    for d in tqdm(range(latency_repeats), desc="  batch 1", leave=False):
        plain_latencies.append(generate(plain, None, [d % 10], seed + 1000 + d)[1])
        latencies.append(generate(llm, mode, [d % 10], seed + 1000 + d)[1])
    row["latency_s"] = float(np.median(latencies))
    row["plain_latency_s"] = float(np.median(plain_latencies))
    row["latency_speedup_vs_plain"] = row["plain_latency_s"] / row["latency_s"]
    row["throughput"] = {c: paired_throughput(plain, llm, mode, c, seed + 2000) for c in concurrencies}
    return row


def budget_sweep(plain, sjdpp, mode, budgets, concurrencies, seed=0) -> dict:
    """images/s of `mode` under each server budget, each next to a plain run on the same prompts
    and seeds just before it (the ratio is what is compared: this machine drifts)."""
    from tqdm import tqdm

    sweep = {"default_budget": runtime_of(sjdpp).config.draft_token_budget, "budgets": {}}
    for b in tqdm(budgets, desc="budget sweep"):
        with draft_token_budget(sjdpp, b):  # the plain engine has no drafter: unaffected
            sweep["budgets"][str(b)] = {c: paired_throughput(plain, sjdpp, mode, c, seed + 3000) for c in concurrencies}
    return sweep


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["modes"]
    names = [r["mode"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(19, 4 + 0.15 * len(rows)))
    axes[0].barh(names, [r["forward_passes_per_image"] for r in rows])
    axes[0].set_xlabel("forward passes per image (fewer is better)")
    axes[1].barh(names, [r["latency_speedup_vs_plain"] for r in rows])
    axes[1].axvline(1.0, color="k", ls="--", lw=1)
    axes[1].set_xlabel("latency at batch 1, x lower than plain (paired runs)")
    for r in rows:
        cs = sorted(r["throughput"], key=int)
        # SJD dashed, SJD++ confidence dotted, SJD++ coupled and plain solid
        style = "--" if r["mode"].startswith("SJD ") else ":" if "confidence" in r["mode"] else "-"
        axes[2].plot([int(c) for c in cs], [r["throughput"][c]["ratio_vs_plain"] for c in cs], style, marker="o",
                     color="k" if r["options"] is None else None, label=r["mode"])
    axes[2].axhline(1.0, color="k", ls="--", lw=1)
    axes[2].set_xscale("log", base=2)
    axes[2].set_xlabel("concurrent requests")
    axes[2].set_ylabel("images/s, x plain (paired runs)")
    axes[2].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    for ax in axes[:2]:
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out.parent / f"{out.name}_speed.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if r["accepted_by_position"]:
            ax.plot(range(1, len(r["accepted_by_position"]) + 1), r["accepted_by_position"], label=r["mode"])
    ax.set_xlabel("window position")
    ax.set_ylabel("accepted drafts per image")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.parent / f"{out.name}_acceptance.png", dpi=110)
    plt.close(fig)

    sweep = results["budget_sweep"]
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = list(sweep["budgets"])
    for c in sweep["budgets"][labels[0]]:
        ax.plot(labels, [sweep["budgets"][b][c]["ratio_vs_plain"] for b in labels], marker="o", label=f"{c} requests")
    ax.axhline(1.0, color="k", ls="--", lw=1, label="plain decoding")
    ax.set_xlabel("draft_token_budget (drafts per forward pass, all requests)")
    ax.set_ylabel("images/s, SJD++ / plain")
    ax.set_title(f"{sweep['mode']}; default budget {sweep['default_budget']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.parent / f"{out.name}_budget.png", dpi=110)
    plt.close(fig)


def markdown(results: dict) -> str:
    """The result tables as Markdown, for benchmarks/README.md."""
    rows = results["modes"]
    cs = sorted(rows[0]["throughput"], key=int)
    lines = [
        "| mode | passes/image | x fewer | tokens/pass | latency s (batch 1) | x lower | "
        + " | ".join(f"images/s @{c} (x plain)" for c in cs) + " | class acc | FD |",
        "|---|" + "---:|" * (5 + len(cs) + 2),
    ]
    for r in rows:
        tp = " | ".join(
            f"{r['throughput'][c]['images_per_s']:.2f} ({r['throughput'][c]['ratio_vs_plain']:.2f})" for c in cs
        )
        lines.append(
            f"| {r['mode']} | {r['forward_passes_per_image']:.1f} | {r['pass_reduction_vs_plain']:.2f} | "
            f"{r['tokens_per_pass']:.2f} | {r['latency_s']:.3f} | {r['latency_speedup_vs_plain']:.2f} | {tp} | "
            f"{r['class_accuracy']:.2f} | {r['frechet_distance']:.1f} |"
        )
    sweep = results["budget_sweep"]
    budgets = list(sweep["budgets"])
    sweep_cs = list(sweep["budgets"][budgets[0]])
    lines += [
        "",
        f"Budget sweep, {sweep['mode']} (images/s, x plain measured just before):",
        "",
        "| draft_token_budget | " + " | ".join(f"@{c}" for c in sweep_cs) + " |",
        "|---|" + "---:|" * len(sweep_cs),
    ]
    for b in budgets:
        cells = " | ".join(
            f"{sweep['budgets'][b][c]['images_per_s']:.2f} ({sweep['budgets'][b][c]['ratio_vs_plain']:.2f})" for c in sweep_cs
        )
        lines.append(f"| {'null' if b == 'None' else b} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from vllm import LLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", type=Path, default=DEFAULT_OUT,
                    help="a model folder in the digit model's format (e.g. one trained by vllm_sjdpp.digits.train)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/e2e"))
    args = ap.parse_args()
    started = provenance()

    def sjd(init="above", k=32, ratio_reuse=None):
        """Per-request options: the default verification, or the ratio test with `ratio_reuse`."""
        mode = {"sjdpp_init": init, "sjdpp_num_speculative_tokens": k, "sjdpp_verification": "gumbel"}
        if ratio_reuse is not None:
            mode.update(sjdpp_verification="ratio", sjdpp_reuse=ratio_reuse)
        return mode

    if args.quick:
        modes = [None, sjd(), sjd(ratio_reuse="none"), sjd(ratio_reuse="coupled")]
        concurrencies, per_digit = [1, 8], 2
        budgets, budget_concurrencies, latency_repeats = [None, 512], [32], 3
    else:
        modes = [None] + [sjd(i) for i in ("random", "left", "above")]
        modes += [sjd(ratio_reuse=r) for r in ("none", "coupled", "confidence")]
        modes += [sjd(k=k) for k in (4, 8, 16)]
        concurrencies, per_digit = [1, 8, 32, 64], 10
        budgets, budget_concurrencies, latency_repeats = [None, 1024, 512, 256, 128, 64, 0], [8, 32, 64], 10
    engine = dict(enforce_eager=True, max_model_len=GENERATED_LENGTH + 64, seed=0, disable_log_stats=False, max_num_seqs=64)
    plain = LLM(str(args.model), **engine)
    # Created last: vLLM's metrics registry is per process and the newest engine's is read.
    sjdpp = LLM(str(args.model), speculative_config={"method": "sjdpp", "num_speculative_tokens": MAX_WINDOW}, **engine)
    judge = quality.judge()
    codebook = Codebook.load(args.model)  # the model's own image tokenizer
    real, _ = quality.real_images(held_out=True)
    rows = []
    for mode in modes:
        print(f"measuring {mode_name(mode)}")
        llm = plain if mode is None else sjdpp
        rows.append(measure(llm, plain, mode, concurrencies, per_digit, judge, real, latency_repeats, codebook))
    for r in rows:
        r["pass_reduction_vs_plain"] = rows[0]["forward_passes_per_image"] / r["forward_passes_per_image"]
    sweep = budget_sweep(plain, sjdpp, sjd(), budgets, budget_concurrencies)
    sweep["mode"] = mode_name(sjd())
    results = {"model": str(args.model), "quick": args.quick, "modes": rows, "budget_sweep": sweep,
               "provenance": started}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    plot(results, args.out)
    args.out.with_suffix(".md").write_text(markdown(results))
    print(f"{'mode':<36} {'passes':>7} {'x fewer':>7} {'lat s':>6} {'x lat':>6} "
          + " ".join(f"{'img/s@' + str(c):>9}" for c in concurrencies) + f" {'acc':>5} {'FD':>6}")
    for r in rows:
        print(f"{r['mode']:<36} {r['forward_passes_per_image']:>7.1f} {r['pass_reduction_vs_plain']:>7.2f} "
              f"{r['latency_s']:>6.2f} {r['latency_speedup_vs_plain']:>6.2f} "
              + " ".join(f"{r['throughput'][c]['images_per_s']:>9.2f}" for c in concurrencies)
              + f" {r['class_accuracy']:>5.2f} {r['frechet_distance']:>6.1f}")
    print(f"\nbudget sweep, {sweep['mode']}: images/s relative to plain (default budget {sweep['default_budget']})")
    print(f"{'budget':>8} " + " ".join(f"{'@' + str(c):>7}" for c in budget_concurrencies))
    for b, by_c in sweep["budgets"].items():
        print(f"{b:>8} " + " ".join(f"{by_c[c]['ratio_vs_plain']:>7.2f}" for c in budget_concurrencies))


if __name__ == "__main__":
    main()
