"""A heavy twin of the bundled digit model: the same function, the compute of a real model.

    python -m vllm_sjdpp.digits.twin [--out /tmp/digits-twin] [--hidden 1024] [--layers 10]
                                         [--intermediate 2816] [--dtype float32|bfloat16]

On the 0.84 M-parameter digit model a forward pass costs about what the engine's own per-step
work costs, so a benchmark there measures the plugin's overhead, not the method.  The twin widens
it without changing what it computes (defaults: 128.6 M parameters):
- hidden size 128 -> H, zero-padded: the embeddings and every weight that writes the residual
  stream (o_proj, down_proj) are zero on the new dimensions, so those stay exactly zero;
- RMSNorm averages over H dimensions instead of 128: eps becomes eps * 128 / H and the weights
  are multiplied by sqrt(128 / H), which gives every norm the original's output;
- H / 32 heads of the original head size (the original 4 first) and I MLP units: the new heads'
  and units' output columns (o_proj, down_proj) are zero;
- extra layers whose o_proj and down_proj are zero: identities on the residual stream.
The new weights are random (std 0.02), so every matmul costs what a real model's would.  The
folder keeps the digit model's tokenizer, codebook, generation and SJD++ / guidance defaults.
Builds in seconds; the weights (0.5 GB in fp32) are not committed.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch

from vllm_sjdpp.digits.train import DEFAULT_OUT

HEAD_DIM = 32
COPIED = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "vq_codebook.json")


def widen(src: Path, out: Path, hidden: int = 1024, layers: int = 10, intermediate: int = 2816, seed: int = 0,
          dtype: torch.dtype = torch.float32) -> Path:
    from safetensors.torch import load_file, save_file

    config = json.loads((src / "config.json").read_text())
    h0, l0, i0 = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    if config.get("head_dim", h0 // config["num_attention_heads"]) != HEAD_DIM:
        raise ValueError(f"expected head_dim {HEAD_DIM}")
    if config["num_key_value_heads"] != config["num_attention_heads"]:
        raise ValueError("the widening keeps multi-head attention; the source uses grouped queries")
    if hidden % HEAD_DIM or hidden < h0 or layers < l0 or intermediate < i0:
        raise ValueError(f"the twin must be at least the source's size ({h0} wide, {l0} layers, {i0} MLP units)")
    heads0, heads = h0 // HEAD_DIM, hidden // HEAD_DIM
    old = load_file(src / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.02

    norm_scale = math.sqrt(h0 / hidden)
    new: dict[str, torch.Tensor] = {}
    embed = torch.zeros(config["vocab_size"], hidden)
    embed[:, :h0] = old["model.embed_tokens.weight"]
    new["model.embed_tokens.weight"] = embed
    new["model.norm.weight"] = torch.full((hidden,), norm_scale)
    new["model.norm.weight"][:h0] = old["model.norm.weight"] * norm_scale
    for i in range(layers):
        p, q = f"model.layers.{i}.", f"model.layers.{i}." if i < l0 else None
        for name in ("input_layernorm", "post_attention_layernorm"):
            w = torch.full((hidden,), norm_scale)
            if q:
                w[:h0] = old[q + name + ".weight"] * norm_scale
            new[p + name + ".weight"] = w
        for name in ("q_proj", "k_proj", "v_proj"):  # [heads * 32, hidden]: reads the stream
            w = rand(heads * HEAD_DIM, hidden)
            if q:
                w[: heads0 * HEAD_DIM, :h0] = old[q + "self_attn." + name + ".weight"]
            new[p + "self_attn." + name + ".weight"] = w
        o = torch.zeros(hidden, heads * HEAD_DIM)  # writes the stream: only the original block
        if q:
            o[:h0, : heads0 * HEAD_DIM] = old[q + "self_attn.o_proj.weight"]
        new[p + "self_attn.o_proj.weight"] = o
        for name in ("gate_proj", "up_proj"):
            w = rand(intermediate, hidden)
            if q:
                w[:i0, :h0] = old[q + "mlp." + name + ".weight"]
            new[p + "mlp." + name + ".weight"] = w
        down = torch.zeros(hidden, intermediate)
        if q:
            down[:h0, :i0] = old[q + "mlp.down_proj.weight"]
        new[p + "mlp.down_proj.weight"] = down
    if "lm_head.weight" in old:  # untied source
        head = torch.zeros(config["vocab_size"], hidden)
        head[:, :h0] = old["lm_head.weight"]
        new["lm_head.weight"] = head
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in new.items()}, out / "model.safetensors")
    config.update(
        hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate, num_attention_heads=heads,
        num_key_value_heads=heads, head_dim=HEAD_DIM, rms_norm_eps=config["rms_norm_eps"] * h0 / hidden,
        dtype=str(dtype).removeprefix("torch."),
    )
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in COPIED:
        shutil.copy(src / name, out / name)
    return out


def parameters(folder: Path) -> int:
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m vllm_sjdpp.digits.twin", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=DEFAULT_OUT, help="the digit model to widen (default: the bundled one)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/digits-twin"), help="the twin's folder (default: %(default)s)")
    ap.add_argument("--hidden", type=int, default=1024, help="hidden size (default: %(default)s)")
    ap.add_argument("--layers", type=int, default=10, help="decoder layers (default: %(default)s)")
    ap.add_argument("--intermediate", type=int, default=2816, help="MLP width (default: %(default)s)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights' dtype (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the added weights (default: %(default)s)")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    out = widen(args.src, args.out, args.hidden, args.layers, args.intermediate, args.seed, getattr(torch, args.dtype))
    print(f"wrote {out}: {parameters(out) / 1e6:.1f} M parameters")


if __name__ == "__main__":
    main()
