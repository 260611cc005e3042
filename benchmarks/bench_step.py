"""Time the SJD++ step (verify + resample + redraft + fresh tokens) per call.

CPU: the PyTorch path, eager and fused by TorchInductor (the default), against one softmax over
the same rows (goal: at most 2x).
CUDA (when present): the fused Triton kernel, with the bytes it must move and the bandwidth it
reaches against the device's peak (goal: at least 60%), beside the PyTorch path on the same GPU.

    python benchmarks/bench_step.py [--quick] [--out benchmarks/results/step_<device>.json]
    python benchmarks/bench_step.py --janus [--out benchmarks/results/step_janus_<device>.json]

--janus: Janus-Pro's sizes, the 16384-code logits the plugin samples from against the 118784
columns (102400 text ids + the codes) a model whose logits covered the whole id space would
need; batches of 1, 16 and 32 images, k = 16.

Inputs are a realistic mid-decode batch: every request has k drafts, half of them fresh
(one-hot q) and half redrafted (a full q row), drawn from q, with reuse="coupled".
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from vllm_sjdpp.provenance import provenance
from vllm_sjdpp.kernels import FreshTokens, StepBatch, StepNoise, sjdpp_step

# Janus-Pro (1B and 7B): VQ codebook and text vocabulary.
JANUS_CODES, JANUS_TEXT_VOCAB = 16384, 102400
# Peak DRAM bandwidth from the vendors' data sheets, GB/s.
PEAK_BANDWIDTH_GBS = {"H100 PCIe": 2000, "H100 NVL": 3900, "H100": 3350, "H200": 4800, "A100": 2039}


def make_batch(batch: int, k: int, vocab: int, device: str, seed: int = 0):
    """A step's inputs: the rows over the vocabulary (p, q, the noise) on `device`, the per-request
    settings and drafts on the host, where the step's plan reads them."""
    g = torch.Generator(device=device).manual_seed(seed)
    rows = batch * (k + 1)
    p = torch.softmax(torch.randn(rows, vocab, device=device, generator=g) * 3, -1)
    q = torch.softmax(torch.randn(batch * k, vocab, device=device, generator=g) * 3, -1)
    drafts = torch.multinomial(q, 1, generator=g).squeeze(1).cpu()
    step_batch = StepBatch(
        cu_num_draft_tokens=torch.arange(1, batch + 1) * k,
        target_probs=p,
        draft_token_ids=drafts,
        draft_probs=q,
        draft_is_onehot=(torch.arange(batch * k) % k) >= k // 2,
        greedy=torch.zeros(batch, dtype=torch.bool),
        reuse=torch.ones(batch, dtype=torch.long),
        threshold=torch.full((batch,), 0.5),
        next_window_len=torch.full((batch,), k),
    )
    noise = StepNoise.sample(rows, vocab, batch * k, device=device, generator=g)
    fresh = FreshTokens.build(["random"] * batch, [range(vocab)] * batch, torch.zeros(batch, 1, dtype=torch.long))
    return step_batch, noise, fresh


def timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up (and Triton compilation)
    if device == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def bytes_moved(step_batch: StepBatch, out) -> int:
    """What the row pass must read and write: p, E and (for residuals) q per visited row, q out."""
    p = step_batch.target_probs
    k = step_batch.draft_token_ids.numel() // step_batch.greedy.numel()
    rows_visited = int((k + 1 - out.num_accepted).sum())  # rows a..k of each request
    q_rows_read = int((k - out.num_accepted).clamp_max(k).sum())  # upper bound: residual rows
    q_rows_written = int((~out.next_draft_is_onehot).sum())
    vocab = p.shape[1]
    e = p.element_size()
    return vocab * (rows_visited * (e + 4) + q_rows_read * e + q_rows_written * e)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--janus", action="store_true", help="Janus-Pro's codebook against codes + text vocabulary")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    started = provenance()
    device = args.device
    k = 16
    if args.janus:
        vocabs, batches = [JANUS_CODES, JANUS_CODES + JANUS_TEXT_VOCAB], [1, 16, 32]
    else:
        vocabs = [1024, 16384] if args.quick else [1024, 16384, 65536]
        batches = [1, 16] if args.quick else [1, 16, 64]
    repeats = 3 if args.quick else 7
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    peak = next((v for key, v in PEAK_BANDWIDTH_GBS.items() if key in name), None)
    results = []
    print(f"device: {name}, threads: {torch.get_num_threads()}, k={k}")
    for vocab in vocabs:
        for batch in batches:
            step_batch, noise, fresh = make_batch(batch, k, vocab, device)
            logits = step_batch.target_probs.log()
            row = {"vocab": vocab, "batch": batch, "k": k}
            row["softmax_ms"] = 1e3 * timed(lambda: torch.softmax(logits, -1), device, repeats)
            # As the plugin does: the next proposals go to a buffer kept across steps.
            buffer = torch.empty_like(step_batch.draft_probs)
            for backend in ("torch", "inductor"):
                row[f"{backend}_step_ms"] = 1e3 * timed(
                    lambda: sjdpp_step(step_batch, noise, fresh, backend, buffer), device, repeats
                )
                row[f"{backend}_vs_softmax"] = row[f"{backend}_step_ms"] / row["softmax_ms"]
            if device == "cuda":
                row["triton_step_ms"] = 1e3 * timed(
                    lambda: sjdpp_step(step_batch, noise, fresh, "triton", buffer), device, repeats
                )
                out = sjdpp_step(step_batch, noise, fresh, backend="triton")
                row["bytes_moved"] = bytes_moved(step_batch, out)
                row["triton_gbs"] = row["bytes_moved"] / row["triton_step_ms"] / 1e6
                if peak:
                    row["triton_fraction_of_peak"] = row["triton_gbs"] / peak
            results.append(row)
            print("  ".join(f"{key}={val:.3g}" if isinstance(val, float) else f"{key}={val}" for key, val in row.items()))
    if args.janus:
        for batch in batches:
            codes, full = (next(r for r in results if r["vocab"] == v and r["batch"] == batch) for v in vocabs)
            print(f"batch {batch}: codes only vs codes + text: step {full['inductor_step_ms'] / codes['inductor_step_ms']:.2f}x "
                  f"less time, softmax {full['softmax_ms'] / codes['softmax_ms']:.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": name, "results": results, "provenance": started}, indent=1))


if __name__ == "__main__":
    main()
