"""Train the class-conditional digit generator: a small Llama over VQ codes of 32x32 digits.

    python -m vllm_sjdpp.digits.train [--out DIR] [--minutes 18] [--seed 0]

Seeded, within the time budget on 2 CPU cores, with a progress bar. Writes a Hugging Face model
folder (safetensors, tokenizer, the image codebook, the SJD++ and guidance defaults in
config.json), loss.png and metrics.json (held-out negative log-likelihood per generated token).
The codebook is fitted first, on one augmented copy of each training digit.  Trained for
likelihood only, with class dropout: one prompt in CLASS_DROPOUT loses its class (the
unconditional prompt), so that the same weights give the unconditional branch of
classifier-free guidance.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from . import data
from .tokens import (
    BOS, EOI, GENERATED_LENGTH, IMAGE_TOKENS, PAD, ROW_WIDTH, UNCONDITIONAL, VOCAB,
    build_tokenizer, image_to_ids, prompt_ids, unconditional_prompt_ids,
)
from ..families.base import FAMILY_KEY
from ..families.digits import DigitsFamily
from ..families.rule import CONFIG_KEY, GUIDED_LLAMA
from .vq import MODEL_DIR, Codebook

DEFAULT_OUT = MODEL_DIR
PROMPT_LEN = len(prompt_ids(0))
CLASS_DROPOUT = 0.1


def model_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=128, intermediate_size=352, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4,  # head_dim 32 (vLLM's CPU attention needs >= 32)
        max_position_embeddings=PROMPT_LEN + GENERATED_LENGTH + 64, bos_token_id=BOS, eos_token_id=EOI,
        pad_token_id=PAD, tie_word_embeddings=True, torch_dtype="float32",
        # Read by vllm-sjdpp for its defaults: fresh tokens are image tokens, rows are this wide,
        # and fresh tokens copy the row above (the fewest passes in benchmarks/bench_e2e.py).
        sjdpp={"fresh_token_range": list(IMAGE_TOKENS), "row_width": ROW_WIDTH, "init": "above"},
        # The unconditional prompt of guidance: the rule class dropout trained.
        **{CONFIG_KEY: UNCONDITIONAL.to_config()},
        # The image family that makes prompts and images of this folder (vllm_sjdpp.families).
        **{FAMILY_KEY: DigitsFamily.name},
    )


def batch(images8, labels, idx, rng, codebook: Codebook) -> torch.Tensor:
    seqs = []
    for i in idx:
        prompt = prompt_ids(int(labels[i]))
        if rng.random() < CLASS_DROPOUT:
            prompt = unconditional_prompt_ids(prompt)
        seqs.append(prompt + image_to_ids(data.augment(images8[i], rng), codebook))
    return torch.tensor(seqs)


def held_out_batches(images8, labels, idx, codebook: Codebook):
    """Un-augmented held-out images as token sequences, in batches of about 8."""
    for chunk in np.array_split(idx, max(1, len(idx) // 8)):
        yield torch.tensor([prompt_ids(int(labels[i])) + image_to_ids(data.upscale(images8[i]), codebook) for i in chunk])


@torch.no_grad()
def held_out_nll(model, images8, labels, idx, codebook: Codebook) -> float:
    """Mean negative log-likelihood (nats) per generated token on un-augmented held-out images."""
    model.eval()
    total, count = 0.0, 0
    for seqs in held_out_batches(images8, labels, idx, codebook):
        logits = model(seqs).logits[:, PROMPT_LEN - 1 : -1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), seqs[:, PROMPT_LEN:].reshape(-1), reduction="sum")
        total += float(nll)
        count += seqs[:, PROMPT_LEN:].numel()
    model.train()
    return total / count


@torch.no_grad()
def calibrate_top_k(model, images8, labels, idx, codebook: Codebook, mass: float = 0.99) -> tuple[int, float]:
    """The smallest top-k keeping at least `mass` of the probability on average over held-out
    generated positions, and the mass it keeps: the sampling default (with temperature 1)."""
    model.eval()
    kept = torch.zeros(len(VOCAB))
    count = 0
    for seqs in held_out_batches(images8, labels, idx, codebook):
        probs = model(seqs).logits[:, PROMPT_LEN - 1 : -1].softmax(-1)
        kept += probs.sort(-1, descending=True).values.cumsum(-1).sum((0, 1))
        count += probs.shape[0] * probs.shape[1]
    model.train()
    kept /= count
    k = int((kept < mass).sum()) + 1
    return k, float(kept[k - 1])


def save_sampling_defaults(model, top_k: int) -> None:
    """vLLM reads generation_config.json for requests that leave these unset."""
    model.generation_config.do_sample = True
    model.generation_config.temperature = 1.0
    model.generation_config.top_k = top_k
    model.generation_config.top_p = 1.0


def train(out: Path, minutes: float, seed: int, batch_size: int = 16, lr: float = 3e-3) -> dict:
    """Fits the codebook, then trains for `minutes` in all (codebook included)."""
    from tqdm import tqdm
    from transformers import LlamaForCausalLM

    start = time.monotonic()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    images8, labels = data.load_digits_8x8()
    train_idx, held_idx = data.split(len(labels))
    codebook = Codebook.fit([data.augment(images8[i], rng) for i in train_idx], seed)
    model = LlamaForCausalLM(model_config())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    budget = minutes * 60
    losses: list[tuple[int, float]] = []
    step = 0
    bar = tqdm(total=int(budget), unit="s", desc="training", bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s {postfix}")
    while (elapsed := time.monotonic() - start) < budget:
        frac = elapsed / budget
        for group in opt.param_groups:  # warm-up, then cosine decay over the time budget
            group["lr"] = lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        seqs = batch(images8, labels, rng.choice(train_idx, batch_size), rng, codebook)
        targets = seqs.clone()
        targets[:, :PROMPT_LEN] = -100
        # bf16 matmuls (fp32 weights and optimiser): about 1.3x more steps in the budget on AVX-512 CPUs.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(seqs, labels=targets).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append((step, loss.item()))
        bar.set_postfix_str(f"step {step} loss {np.mean([l for _, l in losses[-20:]]):.3f}")
        bar.update(min(time.monotonic() - start, budget) - bar.n)
    bar.close()
    nll = held_out_nll(model, images8, labels, held_idx, codebook)
    top_k, mass = calibrate_top_k(model, images8, labels, held_idx, codebook)
    save_sampling_defaults(model, top_k)
    metrics = {
        "sampling_defaults": {"temperature": 1.0, "top_k": top_k, "mean_mass_kept": mass},
        "steps": step, "batch_size": batch_size, "minutes": (time.monotonic() - start) / 60, "seed": seed,
        "held_out_nll_nats_per_token": nll, "held_out_images": int(len(held_idx)),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out)
    build_tokenizer().save_pretrained(out)
    codebook.save(out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    plot_losses(losses, nll, out / "loss.png")
    return metrics


def save_model(model, out: Path) -> None:
    """save_pretrained names transformers' class in config.json; vLLM must build the guided one
    (transformers' Auto classes go by model_type and still load it)."""
    model.save_pretrained(out, safe_serialization=True)
    path = out / "config.json"
    config = json.loads(path.read_text())
    config["architectures"] = [GUIDED_LLAMA]
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def calibrate_saved(out: Path) -> dict:
    """Sampling defaults for an already trained model folder (what `train` does at its end)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(out)
    images8, labels = data.load_digits_8x8()
    _, held_idx = data.split(len(labels))
    top_k, mass = calibrate_top_k(model, images8, labels, held_idx, Codebook.load(out))
    save_sampling_defaults(model, top_k)
    model.generation_config.save_pretrained(out)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["sampling_defaults"] = {"temperature": 1.0, "top_k": top_k, "mean_mass_kept": mass}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def save_guidance_scale(out: Path, scale: float) -> None:
    """The default classifier-free guidance scale (generation_config.json, transformers' name):
    chosen by the sweep of benchmarks/digits_quality.py after training."""
    from transformers import GenerationConfig

    config = GenerationConfig.from_pretrained(out)
    config.guidance_scale = scale
    config.save_pretrained(out)


def plot_losses(losses, held_out: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, values = zip(*losses)
    window = max(1, min(25, len(values) // 4))
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, values, alpha=0.3, label="training loss (batch)")
    ax.plot(steps[window - 1 :], smooth, label=f"training loss ({window}-step mean)")
    ax.axhline(held_out, color="k", ls="--", label=f"held-out NLL {held_out:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("nats per generated token")
    ax.set_title("Digit generator training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m vllm_sjdpp.digits.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the model folder to write (default: the bundled one)")
    ap.add_argument("--minutes", type=float, default=18.0, help="training time budget (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="training seed (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per step (default: %(default)s)")
    ap.add_argument("--calibrate-only", action="store_true", help="only (re)write the sampling defaults of --out")
    ap.add_argument("--guidance-scale", type=float, help="only write this default guidance scale into --out")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    if args.guidance_scale is not None:
        if args.guidance_scale < 0:
            ap.error("--guidance-scale must be >= 0")
        save_guidance_scale(args.out, args.guidance_scale)
        return
    if args.calibrate_only:
        print(json.dumps(calibrate_saved(args.out), indent=1))
        return
    if args.minutes <= 0 or args.batch_size < 1:
        ap.error("--minutes and --batch-size must be positive")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(json.dumps(train(args.out, args.minutes, args.seed, args.batch_size), indent=1))


if __name__ == "__main__":
    main()
