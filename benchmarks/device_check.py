"""The device check: what a CUDA machine with torch, triton and transformers (no vLLM) tells
about the plugin, in one run of a few minutes (under 8 on an H100 or H200).

    bash benchmarks/device_check.sh [--out benchmarks/results/device_check] [--quick]

1. kernels: the Triton kernels against their references in every specialisation that
   `kernels.compile_check` lists (the noise kernel at vocabularies that are and are not a multiple
   of its block; the row pass with float32, bfloat16 and float16 probabilities, and float32
   probabilities into bfloat16 and float16 proposals): the noise bit-identical to the NumPy
   reference, the step's committed tokens and next windows identical to the PyTorch row pass's on
   the same inputs (ratio-test rows and Gumbel-coupled rows), the proposals equal to rounding.
   Then one SJD++ step under `torch.cuda.set_sync_debug_mode("error")`: a host sync that the step
   does not make on purpose fails it.
2. step: the SJD++ step's time per call (Gumbel-coupled, the default) and the bandwidth its row
   pass reaches, at Janus-Pro's 16384 codes and Emu3's 184622 ids, 1 to 64 requests, k = 16 and 32.
3. pass cost: a forward of q query tokens per sequence (q = 1 to 65) at 1, 4 and 16 sequences over
   a KV cache of 576, 2352 and 8193 tokens (Janus-Pro's image, Lumina-mGPT's at 768 px, Emu3's
   context), through a Llama-7B-shaped stack: hidden 4096, 32 heads, MLP 11008, LAYERS layers of
   full width, random weights, bfloat16, transformers' SDPA attention.  t(q) / t(1) is the pass
   cost ratio that turns a step compression (tokens per pass) into latency on this GPU.

Without CUDA this is a dry run: part 1 in Triton's interpreter on CPU tensors at small sizes,
parts 2 and 3 at toy sizes on CPU (the code runs; the numbers describe nothing), and the JSON's
"skipped" lists what did not run and why.  Writes <out>.json and <out>.png; exits non-zero if
a kernel disagrees with its reference or the step syncs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # read when a kernel is defined: before any kernel module is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_step import PEAK_BANDWIDTH_GBS, bytes_moved, make_batch  # noqa: E402
from vllm_sjdpp.provenance import provenance  # noqa: E402

from vllm_sjdpp.kernels import StepNoise, sjdpp_step  # noqa: E402
from vllm_sjdpp.kernels.noise import keyed_exponentials_numpy, request_key, row_keys  # noqa: E402

JANUS_CODES, EMU3_VOCAB = 16384, 184622
LAYERS = 4
LLAMA_7B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class Sizes:
    """What each part runs: the real sizes on CUDA, toy ones in a dry run."""

    noise_vocabs: tuple[int, ...]
    row_pass_vocabs: tuple[int, ...]
    step_vocabs: tuple[int, ...]
    step_batches: tuple[int, ...]
    windows: tuple[int, ...]
    pass_batches: tuple[int, ...]
    contexts: tuple[int, ...]
    queries: tuple[int, ...]
    model: dict
    repeats: int

    @classmethod
    def of(cls, cuda: bool, quick: bool) -> "Sizes":
        if cuda:
            return cls(
                noise_vocabs=(274, JANUS_CODES, 102400, EMU3_VOCAB), row_pass_vocabs=(274, 102400),
                step_vocabs=(JANUS_CODES, EMU3_VOCAB), step_batches=(1, 4, 16) if quick else (1, 4, 16, 64),
                windows=(16, 32), pass_batches=(1, 4, 16), contexts=(576, 2352, 8193),
                queries=(1, 2, 5, 9, 17, 33, 65) if quick else (1, 2, 3, 5, 9, 13, 17, 25, 33, 49, 65),
                model=dict(LLAMA_7B, num_hidden_layers=LAYERS), repeats=5 if quick else 10,
            )
        return cls(
            noise_vocabs=(274, 600), row_pass_vocabs=(274, 600), step_vocabs=(274,), step_batches=(1, 4),
            windows=(4,), pass_batches=(1, 2), contexts=(16, 48), queries=(1, 5),
            model=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
                       num_hidden_layers=2),
            repeats=2,
        )


def synchronize() -> None:
    if CUDA:
        torch.cuda.synchronize()


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: compilation, allocator
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


# Part 1 ------------------------------------------------------------------------------------------

def check_noise(vocab: int, device: str) -> dict:
    from vllm_sjdpp.kernels.noise_triton import keyed_exponentials_triton

    keys = np.array([request_key(s) for s in (0, 7, 2**40 + 3, -5) for _ in range(4)], dtype=np.uint64)
    positions = np.tile(np.array([0, 1, 576, 2**31 - 1]), 4)
    a, b = row_keys(keys, positions)
    got = keyed_exponentials_triton(a, b, vocab, device).cpu().numpy()
    return {"kernel": "noise", "vocab": vocab, "identical": bool(np.array_equal(got, keyed_exponentials_numpy(a, b, vocab)))}


def gumbel_coupled(step_batch, noise, k: int):
    """The same batch verified by Gumbel coupling: every request keyed, its rows racing
    position-keyed noise (what a seeded request runs, and the default).  The noise is made here,
    outside the sync-debug check: its key uploads are the caller's."""
    batch = step_batch.greedy.numel()
    rows = [k + 1] * batch
    slots = step_batch.next_window_len.tolist()
    keyed = StepNoise.sample_per_request(rows, slots, step_batch.target_probs.shape[1], {},
                                         step_batch.target_probs.device, keys={i: (i, 40) for i in range(batch)})
    return dataclasses.replace(step_batch, gumbel=torch.ones(batch, dtype=torch.bool)), keyed


def check_row_pass(vocab: int, dtype: str, out_dtype: str, device: str) -> dict:
    """The step with the Triton row pass against the PyTorch one, same inputs."""
    k, batch = 8, 3
    step_batch, noise, fresh = make_batch(batch, k, vocab, device, seed=vocab)
    step_batch = dataclasses.replace(step_batch, target_probs=step_batch.target_probs.to(DTYPES[dtype]),
                                     draft_probs=step_batch.draft_probs.to(DTYPES[dtype]))
    result = {"kernel": "row_pass", "vocab": vocab, "probs": dtype, "proposals": out_dtype}
    for name, (sb, nz) in {"ratio": (step_batch, noise), "gumbel": gumbel_coupled(step_batch, noise, k)}.items():
        outs = {}
        for backend in ("triton", "torch"):
            buffer = torch.empty(batch * k, vocab, dtype=DTYPES[out_dtype], device=device)
            outs[backend] = sjdpp_step(sb, nz, fresh, backend=backend, next_probs_out=buffer)
        t, r = outs["triton"], outs["torch"]
        same_tokens = all(
            np.array_equal(getattr(t.host, f), getattr(r.host, f))
            for f in ("output_token_ids", "num_accepted", "next_draft_token_ids", "next_draft_prob_rows")
        )
        tolerance = 1e-6 if out_dtype == "fp32" else 1e-2
        same_probs = bool(torch.allclose(t.next_draft_probs.float(), r.next_draft_probs.float(), atol=tolerance))
        result[name] = {"same_tokens": same_tokens, "same_proposals": same_probs}
    result["identical"] = all(result[n]["same_tokens"] and result[n]["same_proposals"] for n in ("ratio", "gumbel"))
    return result


def check_sync_free(vocab: int) -> dict:
    """One Gumbel-coupled step with every implicit device-to-host sync an error."""
    step_batch, noise, fresh = make_batch(4, 16, vocab, "cuda")
    step_batch, noise = gumbel_coupled(step_batch, noise, 16)
    sjdpp_step(step_batch, noise, fresh)  # compile first: compilation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sjdpp_step(step_batch, noise, fresh)
        return {"check": "sync_debug", "ok": True}
    except Exception as error:  # the sync error, or anything else that stops the step
        return {"check": "sync_debug", "ok": False, "error": str(error)[:500]}
    finally:
        torch.cuda.set_sync_debug_mode("default")


def part_kernels(sizes: Sizes, device: str, skipped: list[str]) -> list[dict]:
    rows = [check_noise(v, device) for v in sizes.noise_vocabs]
    variants = [(v, dt, dt) for v in sizes.row_pass_vocabs for dt in DTYPES]
    variants += [(sizes.row_pass_vocabs[-1], "fp32", out) for out in ("bf16", "fp16")]
    rows += [check_row_pass(v, dt, out, device) for v, dt, out in variants]
    if CUDA:
        rows.append(check_sync_free(JANUS_CODES))
    else:
        skipped.append("kernels: the sync-debug step (CUDA only); the kernels ran in Triton's interpreter at "
                       f"vocabularies {sizes.row_pass_vocabs}, not compiled for a GPU")
    return rows


# Part 2 ------------------------------------------------------------------------------------------

def part_step(sizes: Sizes, device: str, skipped: list[str]) -> list[dict]:
    name = torch.cuda.get_device_name() if CUDA else ""
    peak = next((v for key, v in PEAK_BANDWIDTH_GBS.items() if key in name), None)
    rows = []
    for vocab in sizes.step_vocabs:
        for k in sizes.windows:
            for batch in sizes.step_batches:
                step_batch, noise, fresh = make_batch(batch, k, vocab, device)
                step_batch, noise = gumbel_coupled(step_batch, noise, k)
                seconds = median_seconds(lambda: sjdpp_step(step_batch, noise, fresh), sizes.repeats)
                moved = bytes_moved(step_batch, sjdpp_step(step_batch, noise, fresh))
                row = {"vocab": vocab, "k": k, "requests": batch, "ms": 1e3 * seconds, "gb_per_s": moved / seconds / 1e9}
                if peak:
                    row["fraction_of_peak"] = row["gb_per_s"] / peak
                rows.append(row)
                del step_batch, noise, fresh
    if not CUDA:
        skipped.append(f"step: Janus's and Emu3's vocabularies (toy vocabularies {sizes.step_vocabs} on CPU)")
    return rows


# Part 3 ------------------------------------------------------------------------------------------

def part_pass_cost(sizes: Sizes, device: str, skipped: list[str]) -> list[dict]:
    from transformers import DynamicCache, LlamaConfig, LlamaModel

    dtype = torch.bfloat16 if CUDA else torch.float32
    config = LlamaConfig(vocab_size=1024, max_position_embeddings=max(sizes.contexts) + max(sizes.queries) + 1,
                         attn_implementation="sdpa", **sizes.model)
    torch.manual_seed(0)
    model = LlamaModel(config).to(device=device, dtype=dtype).eval()
    layers, heads = config.num_hidden_layers, config.num_key_value_heads
    head_dim = config.hidden_size // config.num_attention_heads
    rows = []
    with torch.inference_mode():
        for batch in sizes.pass_batches:
            for context in sizes.contexts:
                kv = [torch.randn(batch, heads, context, head_dim, device=device, dtype=dtype) for _ in range(2 * layers)]
                times = {}
                for q in sizes.queries:
                    ids = torch.randint(0, config.vocab_size, (batch, q), device=device)
                    positions = torch.arange(context, context + q, device=device).expand(batch, q)

                    def forward():
                        cache = DynamicCache()
                        for layer in range(layers):
                            cache.update(kv[2 * layer], kv[2 * layer + 1], layer)
                        model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True)

                    times[q] = median_seconds(forward, sizes.repeats)
                for q, seconds in times.items():
                    rows.append({"sequences": batch, "context": context, "queries": q, "ms": 1e3 * seconds,
                                 "x_one_query": seconds / times[sizes.queries[0]]})
                del kv
    if not CUDA:
        skipped.append("pass cost: the Llama-7B-shaped stack in bfloat16 (a toy stack in float32 on CPU)")
    return rows


# Report ------------------------------------------------------------------------------------------

def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (key, rows) in enumerate(_groups(result["pass_cost"], ("sequences", "context")).items()):
        a.plot([r["queries"] for r in rows], [r["x_one_query"] for r in rows], "o-", ms=3,
               label=f"{key[0]} seq, KV {key[1]}", color=f"C{i % 10}")
    a.set_xlabel("query tokens per sequence (1 + drafts)")
    a.set_ylabel("forward time / time of 1 query token")
    a.set_title("pass cost ratio")
    a.legend(fontsize=7)
    for i, (key, rows) in enumerate(_groups(result["step"], ("vocab", "k")).items()):
        b.plot([r["requests"] for r in rows], [r["ms"] for r in rows], "o-", label=f"V {key[0]}, k {key[1]}",
               color=f"C{i}")
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xlabel("requests")
    b.set_ylabel("ms per SJD++ step")
    b.set_title("the step")
    b.legend(fontsize=7)
    fig.suptitle(f"device check: {result['device']}" + ("" if result["cuda"] else " (dry run on CPU: toy sizes)"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _groups(rows: list[dict], keys: tuple[str, str]) -> dict:
    groups: dict = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return groups


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/device_check"))
    ap.add_argument("--quick", action="store_true", help="fewer batch sizes, query lengths and repeats")
    args = ap.parse_args(argv)
    device = "cuda" if CUDA else "cpu"
    sizes = Sizes.of(CUDA, args.quick)
    skipped: list[str] = []
    start = time.perf_counter()
    result = {
        "device": torch.cuda.get_device_name() if CUDA else platform.processor() or platform.machine(),
        "cuda": CUDA, "torch": torch.__version__, "sizes": dataclasses.asdict(sizes),
        "provenance": provenance(),
    }
    for name, part in (("kernels", part_kernels), ("step", part_step), ("pass_cost", part_pass_cost)):
        t0 = time.perf_counter()
        result[name] = part(sizes, device, skipped)
        print(f"{name}: {len(result[name])} rows in {time.perf_counter() - t0:.0f} s", flush=True)
    result["skipped"] = skipped
    result["seconds"] = time.perf_counter() - start
    failed = [r for r in result["kernels"] if not r.get("identical", r.get("ok", False))]
    result["failed"] = failed
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    for line in skipped:
        print("skipped:", line)
    print(f"kernels: {len(result['kernels']) - len(failed)} of {len(result['kernels'])} agree; wrote "
          f"{args.out.with_suffix('.json')} and .png in {result['seconds']:.0f} s")
    for row in failed:
        print("FAILED:", json.dumps(row))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
