"""Digits 0 to 9 from the bundled model through `vllm serve --speculative-config sjdpp`.

    python -m vllm_sjdpp.digits.demo [--out digits.png] [--model DIR] [--spec-config JSON]
                                     [--guidance-scale S]

Starts a vLLM server on loopback with SJD++, asks the OpenAI-compatible completions endpoint
for "a handwritten 0" ... "a handwritten 9" twice in the same run, decoded plainly (per-request
`sjdpp_disable`) and with SJD++, both with classifier-free guidance (the model's default scale
from its generation_config.json unless --guidance-scale is given), writes both rows to one PNG,
prints forward passes, wall time and the speed-up, and stops the server.  Same seeds for both:
sampling stays exact, so the rows are different draws from the same distribution, not the same
images.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..server import vllm_server
from .tokens import GENERATED_LENGTH, ids_to_image, to_png
from .train import DEFAULT_OUT
from .vq import Codebook

DEFAULT_SPEC = {"method": "sjdpp"}  # the defaults, with the model folder's (init="above")


@dataclass
class Generation:
    digit: int
    token_ids: list[int]


def accepted_draft_tokens(base: str) -> float:
    """vLLM's counter of accepted draft tokens. Each forward pass of a request commits its
    accepted drafts plus one token, so passes = tokens - accepted drafts, exactly."""
    import httpx

    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith("vllm:spec_decode_num_accepted_tokens_total{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def generate_digits(
    base: str, model: str, plain: bool, seed: int, guidance_scale: float | None = None, progress=None
) -> list[Generation]:
    """One streamed request per digit, all ten at once."""
    from openai import OpenAI

    client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)

    xargs = {"sjdpp_disable": plain}
    if guidance_scale is not None:
        xargs["guidance_scale"] = guidance_scale

    def one(digit: int) -> Generation:
        stream = client.completions.create(
            model=model, prompt=f"a handwritten {digit}", max_tokens=GENERATED_LENGTH, stream=True,
            seed=seed + digit, extra_body={"return_token_ids": True, "vllm_xargs": xargs},
        )
        tokens = []
        for chunk in stream:
            new = [t for c in chunk.choices for t in (c.token_ids or [])]
            tokens += new
            if progress is not None:
                progress.update(len(new))
        return Generation(digit, tokens)

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        return list(pool.map(one, range(10)))


def main(argv: list[str] | None = None) -> None:
    from tqdm import tqdm

    from .quality import judge

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--out", type=Path, default=Path("digits.png"))
    ap.add_argument("--spec-config", type=json.loads, default=DEFAULT_SPEC)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance-scale", type=float, default=None,
                    help="classifier-free guidance scale (default: the model's generation_config.json)")
    args = ap.parse_args(argv)
    if not (args.model / "config.json").exists():
        ap.error(f"no model at {args.model}")

    log_path = Path(tempfile.mkdtemp(prefix="sjdpp-demo-")) / "vllm-serve.log"
    print(f"starting vllm serve {args.model.name} --speculative-config '{json.dumps(args.spec_config)}' (log: {log_path})")
    results = {}
    serve_args = [
        "--speculative-config", json.dumps(args.spec_config),
        "--max-model-len", str(GENERATED_LENGTH + 64), "--max-num-seqs", "32",
    ]
    with vllm_server(args.model, serve_args, log_path) as base:
        for name, plain in (("plain", True), ("SJD++", False)):
            with tqdm(total=10 * GENERATED_LENGTH, unit="tok", desc=f"{name:>5} digits 0-9") as bar:
                accepted = accepted_draft_tokens(base)
                start = time.perf_counter()
                gens = generate_digits(base, str(args.model), plain, args.seed, args.guidance_scale, bar)
                wall = time.perf_counter() - start
                passes = sum(len(g.token_ids) for g in gens) - (accepted_draft_tokens(base) - accepted)
                results[name] = (gens, wall, passes / len(gens))
    print("server stopped")

    with warnings.catch_warnings(record=True) as malformed:
        warnings.simplefilter("always")
        codebook = Codebook.load(args.model)  # the model's own image tokenizer
        images = {name: [ids_to_image(g.token_ids, codebook=codebook) for g in gens] for name, (gens, _, _) in results.items()}
    for w in malformed:
        print(f"warning: {w.message} (drawn best-effort)")
    to_png(images["SJD++"] + images["plain"], args.out, columns=10)
    scale = args.guidance_scale
    if scale is None:
        scale = json.loads((args.model / "generation_config.json").read_text()).get("guidance_scale", 1.0)
    print(f"wrote {args.out} (top row: SJD++, bottom row: plain decoding; guidance scale {scale})")
    j = judge()
    print(f"{'mode':<6} {'tokens/image':>12} {'passes/image':>12} {'wall s':>7} {'class acc':>9}")
    for name, (gens, wall, passes) in results.items():
        tokens = sum(len(g.token_ids) for g in gens) / len(gens)
        acc = j.accuracy(images[name], [g.digit for g in gens])
        print(f"{name:<6} {tokens:>12.0f} {passes:>12.1f} {wall:>7.1f} {acc:>9.0%}")
    (_, plain_wall, plain_passes), (_, sj_wall, sj_passes) = results["plain"], results["SJD++"]
    print(f"SJD++ speed-up over plain decoding, same run: {plain_passes / sj_passes:.2f}x fewer forward "
          f"passes, {plain_wall / sj_wall:.2f}x wall time")


if __name__ == "__main__":
    main()
