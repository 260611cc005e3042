"""Where the bundled digit model's drafts are accepted: by image column and by slot in the window,
for full windows of several lengths.  The data the simulated engine's acceptance is fitted to
(tests/sim_engine.py, `fit_drafts`).

    python benchmarks/digits_acceptance.py [--windows 4,8,16,32] [--rounds 5] [--images 20]
                                           [--dtype auto]
                                           [--out benchmarks/results/digits_acceptance]

One in-process SJD++ engine (the model's defaults: guidance at its scale, init "above", Gumbel
coupling), every request's window fixed at k (`sjdpp_num_speculative_tokens`, no draft-token
budget); per k, --rounds rounds of --images images at once (digit i mod 10, seed 100 * round + i).
For every verified window, each draft tested (the first, and every later one whose predecessors
were all accepted) is counted at its image column (0-15 the codes of a row, 16 its <eol>) and its
slot (0: the window's first draft), with whether it was accepted.  Also per k: drafts accepted per
pass, 273 / passes - 1 (each pass commits its accepted drafts and one token).
Writes <out>.json, <out>.md and <out>.png (acceptance by slot per k, by column at the longest k).
--dtype is the served dtype (vLLM's `dtype`; "auto": bf16 where the CPU computes it natively):
acceptance depends on it, as the logits do (the README's demo in float32 under the AVX2 cap
commits 3.43 tokens a pass with full windows of 32, in bf16 3.26: README.md's speed-up tables,
6402111 and f63b954).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import bench_e2e  # noqa: E402  (sets the in-process engine environment first)

from vllm_sjdpp.digits.tokens import ROW_WIDTH  # noqa: E402
from vllm_sjdpp.digits.train import DEFAULT_OUT  # noqa: E402
from vllm_sjdpp.engine.runtime import runtime_of  # noqa: E402

MAX_WINDOW = 32


def measure(windows: list[int], rounds: int, images: int, model: str = str(DEFAULT_OUT),
            dtype: str = "auto") -> dict:
    """Per window length: drafts tested and accepted, [column, slot], and drafts accepted per pass."""
    llm = bench_e2e.full_window_engine(model, MAX_WINDOW, dtype)
    runtime = runtime_of(llm)
    shape = (len(windows), ROW_WIDTH, MAX_WINDOW + 1)
    tested, accepted = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)
    tokens, passes = np.zeros(len(windows)), np.zeros(len(windows))
    current = [0]
    record = runtime.record_windows

    def counted(plan, out):
        prompts = runtime.runner.input_batch.num_prompt_tokens[: len(plan.counts)]
        for start, verified, taken, prompt in zip(plan.start, plan.counts, out.host.num_accepted.tolist(), prompts):
            generated = start - int(prompt)  # the window's first draft is this generated token
            for slot in range(min(verified, taken + 1)):  # tested: all before it accepted
                column = (generated + slot) % ROW_WIDTH
                tested[current[0], column, slot] += 1
                accepted[current[0], column, slot] += slot < taken
        return record(plan, out)

    runtime.record_windows = counted
    for r in range(rounds):
        for i, k in enumerate(windows):
            current[0] = i
            out, _, taken, _ = bench_e2e.generate(llm, {"sjdpp_num_speculative_tokens": k},
                                                  [j % 10 for j in range(images)], seed=100 * r)
            generated = sum(map(len, out))
            tokens[i] += generated
            passes[i] += generated - taken
    return {
        "windows": windows, "images": rounds * images, "columns": ROW_WIDTH,
        "dtype": bench_e2e.served_dtype(llm),
        "tested": tested.tolist(), "accepted": accepted.tolist(),
        "drafts_per_pass": (tokens / passes - 1).tolist(),
    }


def rates(result: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Acceptance by slot [k, slot], by column of first drafts and of later ones [k, column]
    (NaN where nothing was tested)."""
    tested, accepted = np.array(result["tested"], dtype=float), np.array(result["accepted"], dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        by_slot = accepted.sum(1) / tested.sum(1)
        first = accepted[:, :, 0] / tested[:, :, 0]
        later = accepted[:, :, 1:].sum(2) / tested[:, :, 1:].sum(2)
    return by_slot, first, later


def markdown(result: dict) -> str:
    by_slot, first, later = rates(result)
    served = f", served in {result['dtype']}" if "dtype" in result else ""
    lines = [f"Digit model, full windows, {result['images']} images per length{served}.", "",
             "| k | drafts accepted per pass | first draft | " + " | ".join(f"slot {s}" for s in (1, 2, 4, 8, 12, 14, 15, 16)) + " |",
             "|---|---|---|" + "---|" * 8]
    for i, k in enumerate(result["windows"]):
        cells = [f"{by_slot[i, s]:.2f}" if s < k and np.isfinite(by_slot[i, s]) else "" for s in (1, 2, 4, 8, 12, 14, 15, 16)]
        lines.append(f"| {k} | {result['drafts_per_pass'][i]:.3f} | {by_slot[i, 0]:.3f} | " + " | ".join(cells) + " |")
    k = len(result["windows"]) - 1
    lines += ["", f"By image column, k = {result['windows'][k]} (16: <eol>):", "",
              "| column | " + " | ".join(str(c) for c in range(result["columns"])) + " |",
              "|---|" + "---|" * result["columns"],
              "| first draft | " + " | ".join("" if np.isnan(x) else f"{x:.2f}" for x in first[k]) + " |",
              "| later draft | " + " | ".join("" if np.isnan(x) else f"{x:.2f}" for x in later[k]) + " |", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_slot, first, later = rates(result)
    tested = np.array(result["tested"]).sum(1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, k in enumerate(result["windows"]):
        slots = np.flatnonzero(tested[i] >= 20)
        left.plot(slots, by_slot[i, slots], marker=".", label=f"k = {k}")
    left.set(xlabel="slot in the window (0: first draft)", ylabel="accepted, all before it accepted",
             title="By slot (slots tested 20 times or more)", ylim=(0, 1.02))
    left.legend()
    k = len(result["windows"]) - 1
    columns = np.arange(result["columns"])
    right.plot(columns, first[k], marker="o", label="a window's first draft")
    right.plot(columns, later[k], marker="s", label="a later draft")
    right.set(xlabel="image column (16: <eol>)", ylabel="accepted", ylim=(0, 1.02),
              title=f"By column, k = {result['windows'][k]}")
    right.legend()
    served = f" ({result['dtype']})" if "dtype" in result else ""
    fig.suptitle(f"Digit model: where drafts are accepted{served}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", default="4,8,16,32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--dtype", default="auto", help="the served dtype (vLLM's dtype)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "digits_acceptance")
    args = parser.parse_args()
    windows = bench_e2e.window_lengths(parser, args.windows, MAX_WINDOW)
    result = measure(windows, args.rounds, args.images, dtype=args.dtype)
    bench_e2e.write_results(args.out, result, markdown, plot)


if __name__ == "__main__":
    main()
