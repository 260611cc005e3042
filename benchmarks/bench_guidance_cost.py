"""What classifier-free guidance costs: a guided forward pass against an unguided one, and the KV
cache capacity, on the bundled digit model; and what the two designs for an unconditional context
of its own length would cost (issue 22), measured by proxies.

    python benchmarks/bench_guidance_cost.py [--repeats 5] [--out benchmarks/results/guidance_cost.json]

The same weights served in one process: guided (the folder's GuidedLlamaForCausalLM, both
branches in every pass) and unguided (hf_overrides: LlamaForCausalLM).  Plain decoding, no
speculation, whole images (273 tokens, one pass each), at batch 1 and 32.  Every timing of a
round is taken back to back (this machine drifts between minutes); the ratio of the medians is
reported.  KV capacity: the tokens vLLM's KV cache holds for each engine, out of the same
VLLM_CPU_KVCACHE_SPACE.

The proxies, each what its design adds to a guided image's pass, without the design itself:
- paired requests (each image a cond and an uncond sequence, scheduled together): the unguided
  engine at twice the batch, the same rows as guidance as separate sequences (it leaves out the
  pairing's own scheduler and logits bookkeeping);
- per-branch key masking in the doubled-heads layout: the guided engine on a copy of the weights
  with each head zero-padded from 32 to 64 dims, the next head size vLLM's CPU attention takes
  (32, 64, 80, ...), to hold the mask's extra key dimension (FlashAttention: multiples of 8;
  FlashInfer: 64, 128, 256).  Its logits differ (the attention scale follows the head size); only
  its cost is read.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from vllm_sjdpp.provenance import provenance

for key, value in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(key, value)

from vllm_sjdpp.digits.tokens import GENERATED_LENGTH, prompt_ids  # noqa: E402
from vllm_sjdpp.digits.train import DEFAULT_OUT  # noqa: E402

ENGINE = dict(enforce_eager=True, max_model_len=GENERATED_LENGTH + 64, seed=0, max_num_seqs=64)


def timed(llm, batch: int, extra_args: dict | None) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=1.0, top_k=10, max_tokens=GENERATED_LENGTH, ignore_eos=True, extra_args=extra_args)
    prompts = [{"prompt_token_ids": prompt_ids(i % 10)} for i in range(batch)]
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start


def kv_capacity_tokens(llm) -> int:
    cache = llm.llm_engine.vllm_config.cache_config
    return int(cache.num_gpu_blocks * cache.block_size)


def padded_heads_folder(model: Path, out: Path, head_dim: int) -> Path:
    """A copy of `model` whose attention heads are zero-padded to `head_dim` (cost proxy only)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, out, dirs_exist_ok=True)
    config = json.loads((out / "config.json").read_text())
    old = config["head_dim"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    weights = load_file(str(out / "model.safetensors"))
    for name, w in list(weights.items()):
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            n = heads if "q_proj" in name else kv_heads
            padded = torch.zeros(n, head_dim, w.shape[1], dtype=w.dtype)
            padded[:, :old] = w.view(n, old, -1)
            weights[name] = padded.reshape(n * head_dim, -1)
        elif name.endswith("o_proj.weight"):
            padded = torch.zeros(w.shape[0], heads, head_dim, dtype=w.dtype)
            padded[:, :, :old] = w.view(w.shape[0], heads, old)
            weights[name] = padded.reshape(w.shape[0], -1)
    save_file(weights, str(out / "model.safetensors"))
    config["head_dim"] = head_dim
    (out / "config.json").write_text(json.dumps(config))
    return out


def main() -> None:
    from vllm import LLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    ap.add_argument("--model", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/guidance_cost.json"))
    args = ap.parse_args()
    started = provenance()

    import tempfile

    unguided = LLM(str(args.model), hf_overrides={"architectures": ["LlamaForCausalLM"]}, **ENGINE)
    guided = LLM(str(args.model), **ENGINE)
    padded_dir = padded_heads_folder(args.model, Path(tempfile.mkdtemp()) / "padded", 64)
    masked_proxy = LLM(str(padded_dir), **ENGINE)
    results = {
        "kv_capacity_tokens": {
            "unguided": kv_capacity_tokens(unguided), "guided": kv_capacity_tokens(guided),
            "masked_proxy": kv_capacity_tokens(masked_proxy),
        },
        "batches": {},
        "provenance": started,
    }
    guided_args = {"guidance_scale": 3.0}
    for batch in args.batches:
        rounds = []
        for i in range(args.repeats + 1):  # the first round warms up
            r = {
                "unguided": timed(unguided, batch, None),
                "guided": timed(guided, batch, guided_args),
                "paired_proxy": timed(unguided, 2 * batch, None),
                "masked_proxy": timed(masked_proxy, batch, guided_args),
            }
            if i:
                rounds.append(r)
        median = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        results["batches"][str(batch)] = {
            **{f"{k}_ms_per_pass": 1e3 * v / GENERATED_LENGTH for k, v in median.items()},
            "guided_over_unguided": median["guided"] / median["unguided"],
            "paired_proxy_over_guided": median["paired_proxy"] / median["guided"],
            "masked_proxy_over_guided": median["masked_proxy"] / median["guided"],
            "rounds_s": rounds,
        }
        ms = {k: 1e3 * v / GENERATED_LENGTH for k, v in median.items()}
        print(f"batch {batch:>3}: unguided {ms['unguided']:.2f} ms/pass, guided {ms['guided']:.2f} "
              f"({median['guided'] / median['unguided']:.2f}x); proxies: paired {ms['paired_proxy']:.2f} "
              f"({median['paired_proxy'] / median['guided']:.2f}x guided), masked {ms['masked_proxy']:.2f} "
              f"({median['masked_proxy'] / median['guided']:.2f}x guided) (median of {args.repeats} rounds)")
    kv = results["kv_capacity_tokens"]
    print(f"KV cache capacity: unguided {kv['unguided']:,} tokens, guided {kv['guided']:,} tokens "
          f"({kv['unguided'] / kv['guided']:.2f}x fewer), masked proxy {kv['masked_proxy']:,}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
