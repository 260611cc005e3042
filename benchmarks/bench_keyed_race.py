"""The race of a keyed batch on CPU: where a token can win (`kernels/keyed_race.py`) against the
dense noise and row pass the step ran before, side by side at each shape, in milliseconds.

    python benchmarks/bench_keyed_race.py [--out benchmarks/results/keyed_race.json]

Shapes: the digit model (274 tokens, top-k 11) at one request's full window (33 rows) and ten
requests' windows (80 rows), Lumina-mGPT (65536, top-k 2000), Emu3 (184622, top-k 2048, and its
32768 visual tokens without top-k), rows half, three quarters and wholly positive (the last two past
MAX_SUPPORT, where a step keeps the dense race; both races are timed at every shape).  One
thread, as vLLM's CPU worker runs the step; the fused kernels compiled first, as a server does.
Each shape checks that both give the same winners.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from vllm_sjdpp.kernels import keyed_race, noise
from vllm_sjdpp.kernels.keyed_race import KeyedRows
from vllm_sjdpp.kernels.step import _row_pass, compile_cpu_step
from vllm_sjdpp.provenance import provenance

SHAPES = [  # (label, rows, vocabulary, tokens kept per row)
    ("digits, 1 request", 33, 274, 11), ("digits, 10 requests", 80, 274, 11),
    ("Lumina-mGPT, 16 rows", 16, 65536, 2000), ("Emu3, 16 rows", 16, 184622, 2048),
    ("Emu3 visual tokens, 16 rows", 16, 184622, 32768), ("Emu3 visual tokens, 128 rows", 128, 184622, 32768),
    ("half positive", 16, 65536, 32768), ("three quarters positive", 16, 65536, 49152),
    ("every token positive", 16, 65536, 65536),
]


def timed_ms(fn, seconds: float = 1.0) -> float:
    fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return 1e3 * (time.perf_counter() - start) / calls


def compare(rows: int, vocab: int, kept: int) -> dict:
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0))
    probs = logits.masked_fill(logits < logits.topk(kept, -1).values[:, -1:], -torch.inf).softmax(-1)
    keyed = KeyedRows(*noise.row_keys(np.full(rows, noise.request_key(1), np.uint64), np.arange(rows)), vocab,
                      torch.device("cpu"))
    index = torch.arange(rows)
    none = torch.full_like(index, -1)
    row_pass = _row_pass(None, probs.device, probs.numel())

    def dense():
        return row_pass(target_probs=probs, draft_probs=None, exponentials=keyed.exponentials(), rows=index,
                        subtract_draft_row=none, subtract_onehot=none, draw=torch.ones_like(index, dtype=torch.bool),
                        q_dest=none, next_probs=probs[:0]).numpy()

    runs_keyed = keyed.race(probs) is not None
    limit, keyed_race.MAX_SUPPORT = keyed_race.MAX_SUPPORT, 1.0  # time it past MAX_SUPPORT too
    try:
        assert np.array_equal(keyed.race(probs), dense()), "the race where a token can win differs from the dense race"
        keyed_ms = timed_ms(lambda: keyed.race(probs))
    finally:
        keyed_race.MAX_SUPPORT = limit
    return {"rows": rows, "vocab": vocab, "kept": kept, "dense_ms": timed_ms(dense), "keyed_ms": keyed_ms,
            "step_runs": "keyed" if runs_keyed else "dense"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/keyed_race.json"))
    args = ap.parse_args(argv)
    started = provenance()
    torch.set_num_threads(1)
    lines = ["| shape | rows x tokens (kept) | dense noise + row pass, ms | where a token can win, ms | ratio | a step runs |",
             "|---|---|---:|---:|---:|---|"]
    results = {}
    with torch.inference_mode():
        for vocab in sorted({v for _, _, v, _ in SHAPES}):
            compile_cpu_step(vocab)
        for label, rows, vocab, kept in SHAPES:
            r = results[label] = compare(rows, vocab, kept)
            runs = "the race where a token can win" if r["step_runs"] == "keyed" else f"the dense race (over {keyed_race.MAX_SUPPORT} positive)"
            lines.append(f"| {label} | {rows} x {vocab} ({kept}) | {r['dense_ms']:.3f} | {r['keyed_ms']:.3f} | "
                         f"{r['dense_ms'] / r['keyed_ms']:.1f}x | {runs} |")
            print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"shapes": results, "provenance": started}, indent=1))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
