"""SJD++ where the forward pass counts: the digit model's heavy twin (vllm_sjdpp/digits/twin.py,
128.8 M parameters) in bf16, plain decoding against SJD++ on the same prompts and seeds.

    python benchmarks/bench_twin.py [--twin /tmp/digits-twin] [--out benchmarks/results/twin]
                                    [--quick]

- Pass cost t_n with n positions, in vLLM: n plain images decoded together take 273 passes of n
  positions (each with both guidance branches), so t_n = wall / 273.  n = 1, k + 1.
- Batch 1, for k = 8, 16, 32 (per-request window, one SJD++ engine with k = 32): passes per image
  and latency, each SJD++ image timed right after the plain one of the same digit and seed.
  The limit is 273 t_1 / (passes_k t_(k+1)): what the passes and the measured pass costs allow
  if the plugin cost nothing.
- Throughput at 1 to 16 concurrent images (k = 32, the server's draft-token budget), paired.
Writes <out>.json, <out>.md and <out>.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import bench_e2e  # noqa: E402  (sets the in-process engine environment first)
from vllm_sjdpp.provenance import provenance  # noqa: E402
from vllm_sjdpp.digits import twin as heavy_twin  # noqa: E402

from vllm_sjdpp.digits.tokens import GENERATED_LENGTH  # noqa: E402
from vllm_sjdpp.digits.train import DEFAULT_OUT  # noqa: E402

WINDOWS = (8, 16, 32)


def mode(k: int) -> dict:
    return {"sjdpp_num_speculative_tokens": k}


def pass_cost(plain, n: int, seed: int) -> float:
    """Seconds per pass with n positions: n plain images decoded together."""
    return bench_e2e.generate(plain, None, [i % 10 for i in range(n)], seed)[1] / GENERATED_LENGTH


def batch_one(plain, sjdpp, k: int, repeats: int, seed: int) -> dict:
    passes, latency, plain_latency = [], [], []
    for d in range(repeats):
        plain_latency.append(bench_e2e.generate(plain, None, [d], seed + d)[1])
        tokens, wall, accepted, _ = bench_e2e.generate(sjdpp, mode(k), [d], seed + d)
        latency.append(wall)
        passes.append(len(tokens[0]) - accepted)
    return {
        "passes_per_image": float(np.mean(passes)), "latency_s": float(np.median(latency)),
        "plain_latency_s": float(np.median(plain_latency)),
        "latency_speedup": float(np.median(plain_latency) / np.median(latency)),
    }


def main(argv: list[str] | None = None) -> None:
    from tqdm import tqdm
    from vllm import LLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--twin", type=Path, default=Path("/tmp/digits-twin"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/twin"))
    ap.add_argument("--quick", action="store_true", help="2 images per window, concurrency 1 and 4")
    args = ap.parse_args(argv)
    started = provenance()
    if not (args.twin / "model.safetensors").exists():
        heavy_twin.widen(DEFAULT_OUT, args.twin)
    repeats, concurrencies = (2, [1, 4]) if args.quick else (4, [1, 2, 4, 8, 16])
    engine = dict(dtype="bfloat16", enforce_eager=True, max_model_len=GENERATED_LENGTH + 64, max_num_seqs=64,
                  seed=0, disable_log_stats=False)
    start = time.perf_counter()
    plain = LLM(str(args.twin), **engine)
    sjdpp = LLM(str(args.twin), speculative_config={"method": "sjdpp", "num_speculative_tokens": max(WINDOWS)}, **engine)
    result = {"model": str(args.twin), "parameters": heavy_twin.parameters(args.twin), "pass_cost_s": {}, "windows": {},
              "throughput": {}, "provenance": started}
    for n in tqdm([1] + [k + 1 for k in WINDOWS], desc="pass cost"):
        result["pass_cost_s"][n] = pass_cost(plain, n, seed=100)
    t1 = result["pass_cost_s"][1]
    for k in tqdm(WINDOWS, desc="batch 1"):
        row = batch_one(plain, sjdpp, k, repeats, seed=200)
        row["limit"] = GENERATED_LENGTH * t1 / (row["passes_per_image"] * result["pass_cost_s"][k + 1])
        row["fraction_of_limit"] = row["latency_speedup"] / row["limit"]
        result["windows"][k] = row
    for c in tqdm(concurrencies, desc="throughput"):
        result["throughput"][c] = bench_e2e.paired_throughput(plain, sjdpp, mode(max(WINDOWS)), c, seed=300)
    result["minutes"] = (time.perf_counter() - start) / 60
    bench_e2e.write_results(args.out, result, markdown, plot)


def markdown(result: dict) -> str:
    costs = result["pass_cost_s"]
    lines = [
        f"Heavy twin, {result['parameters'] / 1e6:.1f} M parameters, bf16; pass cost with n positions (ms): "
        + ", ".join(f"n={n}: {1e3 * t:.1f}" for n, t in costs.items()),
        "",
        "| k | passes/image | latency s (plain) | x lower | limit | of the limit |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for k, r in result["windows"].items():
        lines.append(
            f"| {k} | {r['passes_per_image']:.1f} | {r['latency_s']:.2f} ({r['plain_latency_s']:.2f}) | "
            f"{r['latency_speedup']:.2f} | {r['limit']:.2f} | {r['fraction_of_limit']:.0%} |"
        )
    lines += ["", "| concurrent images | images/s SJD++ | images/s plain | x plain |", "|---:|---:|---:|---:|"]
    for c, r in result["throughput"].items():
        lines.append(f"| {c} | {r['images_per_s']:.3f} | {r['plain_images_per_s']:.3f} | {r['ratio_vs_plain']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    ks = [int(k) for k in result["windows"]]
    rows = list(result["windows"].values())
    a.plot(ks, [r["latency_speedup"] for r in rows], marker="o", label="latency, x lower than plain")
    a.plot(ks, [r["limit"] for r in rows], marker="s", ls="--", label="limit from pass costs and passes")
    a.axhline(1.0, color="k", lw=1)
    a.set_xlabel("window k")
    a.set_xscale("log", base=2)
    a.set_title("batch 1")
    a.legend()
    cs = [int(c) for c in result["throughput"]]
    b.plot(cs, [r["ratio_vs_plain"] for r in result["throughput"].values()], marker="o")
    b.axhline(1.0, color="k", lw=1)
    b.set_xscale("log", base=2)
    b.set_xlabel("concurrent images")
    b.set_ylabel("images/s, SJD++ / plain (paired)")
    b.set_title("throughput, k = 32")
    fig.suptitle(f"heavy twin of the digit model ({result['parameters'] / 1e6:.0f} M parameters, bf16, 2 CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
