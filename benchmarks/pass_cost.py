"""What an engine step costs at one request, by window length: the bundled digit model's pass cost
against the positions in its pass, plain decoding's and SJD++'s, measured side by side in one
engine.  The pass costs the simulated engine's measured profile reads (tests/sim_engine.py).

    python benchmarks/pass_cost.py [--windows 1,2,4,8,12,16,24,32] [--rounds 2] [--dtype auto]
                                   [--out benchmarks/results/pass_cost]

One in-process SJD++ engine with full windows (no draft-token budget, the model's defaults
otherwise: guidance at its scale, Gumbel coupling); the ten digits one image at a time (seed =
digit), each decoded plainly (`sjdpp_disable`) and with its window fixed at each k
(`sjdpp_num_speculative_tokens`), the order of the modes reversed every other image.  A step's
seconds are the interval between the ends of consecutive steps of one image (the goodput
controller's timing: it holds the scheduler's and the output's work of the step before), the
first step of each image (its prompt) left out; a mode's cost is the mean over its steps with
exactly 1 + k positions (most of its steps: near an image's end a window is cut short).
Per mode also the seconds and passes per image, and the speed-up against plain decoding.
Writes <out>.json (per mode every image's seconds and passes, its steps' seconds as statistics),
<out>.md and <out>.png.  --dtype is the served dtype (vLLM's `dtype`; "auto":
bf16 where the CPU computes it natively); run under ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 it is the cost of a CPU without AVX-512.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
import bench_e2e  # noqa: E402  (sets the in-process engine environment first)

from vllm_sjdpp.digits.train import DEFAULT_OUT  # noqa: E402

MAX_WINDOW = 32
DIGITS = 10
CAPPED_ISA = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def measure(windows: list[int], rounds: int, model: str = str(DEFAULT_OUT), dtype: str = "auto") -> dict:
    """Per mode (0: plain decoding, k: windows of k): per image its seconds and passes, and the
    statistics of its steps' seconds with 1 + k positions (`step_statistics`)."""
    llm = bench_e2e.full_window_engine(model, MAX_WINDOW, dtype)
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    ends: list[tuple[float, int]] = []  # (the step's end, its positions)
    sample_tokens = runner.sample_tokens

    def timed(*args, **kwargs):
        out = sample_tokens(*args, **kwargs)
        ends.append((time.perf_counter(), int(runner.query_start_loc.np[runner.input_batch.num_reqs])))
        return out

    runner.sample_tokens = timed
    modes = [0] + windows
    result = {k: {"image_seconds": [], "passes": [], "step_seconds": []} for k in modes}

    def one(digit: int, k: int) -> None:
        ends.clear()
        start = time.perf_counter()
        bench_e2e.generate(llm, {"sjdpp_disable": True} if k == 0 else {"sjdpp_num_speculative_tokens": k}, [digit],
                           seed=digit)
        result[k]["image_seconds"].append(time.perf_counter() - start)
        result[k]["passes"].append(len(ends))
        times, positions = np.array([e[0] for e in ends]), np.array([e[1] for e in ends])
        result[k]["step_seconds"] += np.diff(times)[positions[1:] == 1 + k].tolist()

    for k in modes:  # untimed: every shape's first pass
        one(0, k)
        for entry in result[k].values():
            entry.clear()
    with tqdm(total=rounds * DIGITS * len(modes), desc="images", unit="image") as bar:
        for r in range(rounds):
            for digit in range(DIGITS):
                for k in modes if (r + digit) % 2 == 0 else modes[::-1]:
                    one(digit, k)
                    bar.update()
    for entry in result.values():
        entry["step_seconds"] = step_statistics(entry["step_seconds"])
    return {
        "windows": windows, "rounds": rounds, "images": rounds * DIGITS,
        "dtype": bench_e2e.served_dtype(llm),
        "isa_capped": {key: os.environ[key] for key in CAPPED_ISA if key in os.environ},
        "modes": {str(k): v for k, v in result.items()},
    }


def step_statistics(seconds: list[float]) -> dict[str, float]:
    """A mode's steps' seconds as the JSON keeps them: mean (what the tables and the simulated
    engine read), median, 10th and 90th percentiles, and how many."""
    x = np.asarray(seconds)
    return {"mean": float(x.mean()), "median": float(np.median(x)), "p10": float(np.percentile(x, 10)),
            "p90": float(np.percentile(x, 90)), "count": int(x.size)}


def summary(result: dict) -> dict[int, dict[str, float]]:
    """Per mode: positions, seconds per step (mean) and relative to plain decoding's, seconds and
    passes per image, and the speed-up (plain's seconds per image over the mode's)."""
    modes = {int(k): v for k, v in result["modes"].items()}
    plain_step = modes[0]["step_seconds"]["mean"]
    plain_image = float(np.mean(modes[0]["image_seconds"]))
    return {
        k: {"positions": 1 + k, "step_ms": 1e3 * v["step_seconds"]["mean"],
            "relative": v["step_seconds"]["mean"] / plain_step, "steps_timed": v["step_seconds"]["count"],
            "image_s": float(np.mean(v["image_seconds"])), "passes": float(np.mean(v["passes"])),
            "speedup": plain_image / float(np.mean(v["image_seconds"]))}
        for k, v in sorted(modes.items())
    }


def markdown(result: dict) -> str:
    rows = summary(result)
    capped = " under " + ", ".join(f"{k}={v}" for k, v in result["isa_capped"].items()) if result["isa_capped"] else ""
    lines = [f"Digit model, one image at a time, {result['images']} images per mode, served in {result['dtype']}{capped}.",
             "", "| mode | positions | ms per step | against plain | steps timed | s per image | passes per image | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for k, row in rows.items():
        mode = "plain" if k == 0 else f"k = {k}"
        lines.append(f"| {mode} | {row['positions']} | {row['step_ms']:.2f} | {row['relative']:.3f} | {row['steps_timed']} | "
                     f"{row['image_s']:.3f} | {row['passes']:.1f} | {row['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary(result)
    drafted = [k for k in rows if k]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([rows[k]["positions"] for k in drafted], [rows[k]["step_ms"] for k in drafted], marker="o",
              label="SJD++ (window of k drafts)")
    left.plot([1], [rows[0]["step_ms"]], marker="s", linestyle="", label="plain decoding")
    left.set(xlabel="positions in the pass (1 + k)", ylabel="ms per step", ylim=(0, None),
             title="A step's cost at one request")
    left.legend()
    right.plot(drafted, [rows[k]["speedup"] for k in drafted], marker="o")
    right.axhline(1.0, color="grey", linewidth=0.8)
    right.set(xlabel="window k", ylabel="plain's seconds per image / SJD++'s", title="Lower latency than plain")
    fig.suptitle(f"Digit model, one image at a time ({result['dtype']}{', AVX2' if result['isa_capped'] else ''})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", default="1,2,4,8,12,16,24,32")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="auto", help="the served dtype (vLLM's dtype)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pass_cost")
    args = parser.parse_args()
    windows = bench_e2e.window_lengths(parser, args.windows, MAX_WINDOW)
    result = measure(windows, args.rounds, dtype=args.dtype)
    bench_e2e.write_results(args.out, result, markdown, plot)


if __name__ == "__main__":
    main()
