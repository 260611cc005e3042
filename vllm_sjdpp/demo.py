"""A short generation: plain AR sampling and SJD / SJD++ on the toy table model, side by side.

    python -m vllm_sjdpp.demo [--sequences 2000] [--length 6] [--window 4]

Prints one sample per mode and the forward passes each mode needed (step compression).
"""

from __future__ import annotations

import argparse

from .config import SJDPPConfig
from .toy_ar import TableARModel, sample_plain, sample_sjdpp


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=2000)
    ap.add_argument("--length", type=int, default=6)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8)
    args = ap.parse_args(argv)
    if min(args.sequences, args.length, args.window, args.vocab) < 1:
        ap.error("all sizes must be >= 1")

    model = TableARModel.random(args.vocab, sharpness=3.0, seed=0)
    plain = sample_plain(model, args.sequences, args.length, seed=1)
    print(f"toy AR model: vocabulary {args.vocab}, {args.sequences} sequences of {args.length} tokens")
    print(f"{'mode':<32} {'first sample':<24} forward passes per sequence")
    print(f"{'plain AR':<32} {str(plain[0].tolist()):<24} {args.length:.2f}")
    for reuse, init in [("none", "random"), ("coupled", "random"), ("coupled", "left"), ("confidence", "left")]:
        config = SJDPPConfig(num_speculative_tokens=args.window, reuse=reuse, init=init, threshold=0.3)
        seqs, steps = sample_sjdpp(model, args.sequences, args.length, config, seed=2)
        name = f"SJD reuse={reuse} init={init}"
        print(f"{name:<32} {str(seqs[0].tolist()):<24} {steps.float().mean():.2f}"
              f"  ({args.length / steps.float().mean():.2f}x fewer)")


if __name__ == "__main__":
    main()
