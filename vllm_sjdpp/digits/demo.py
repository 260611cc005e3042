"""Digits 0 to 9 from the bundled model through `vllm serve --speculative-config sjdpp`.

    python -m vllm_sjdpp.digits.demo [--out digits.png] [--model DIR] [--spec-config JSON]
                                     [--guidance-scale S]

Starts a vLLM server on loopback with SJD++ and the images endpoint (`VLLM_PLUGINS=sjdpp,
sjdpp_images`), asks `POST /v1/images/generations` (the openai client's `images.generate`) for
"a handwritten 0" ... "a handwritten 9" twice in the same run, decoded plainly (per-request
`sjdpp_disable`) and with SJD++, both with classifier-free guidance (the model's default scale
from its generation_config.json unless --guidance-scale is given), writes both rows to one PNG,
prints forward passes (each image's, from the response), wall time and the speed-up, and stops
the server.  Same seeds for both: sampling stays exact, so the rows are different draws from the
same distribution, not the same images.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..serving.server import vllm_server
from .tokens import GENERATED_LENGTH, to_png
from .train import DEFAULT_OUT
from .vq import GREY_LEVELS, IMAGE_SIZE

DEFAULT_SPEC = {"method": "sjdpp"}  # the defaults, with the model folder's (init="above")


PLUGINS = "sjdpp,sjdpp_images"  # VLLM_PLUGINS: the endpoint plugin is opt-in


@dataclass
class Generation:
    digit: int
    image: np.ndarray  # grey levels 0..16, as the data
    forward_passes: int
    tokens: int


def generate_digits(
    base: str, model: str, plain: bool, seed: int, guidance_scale: float | None = None, progress=None
) -> list[Generation]:
    """One image request per digit, all ten at once."""
    from openai import OpenAI
    from PIL import Image

    client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)
    extra = {"sjdpp_disable": plain, "seed": seed}
    if guidance_scale is not None:
        extra["guidance_scale"] = guidance_scale

    def one(digit: int) -> Generation:
        out = client.images.generate(
            model=model, prompt=f"a handwritten {digit}", n=1, size=f"{IMAGE_SIZE}x{IMAGE_SIZE}",
            response_format="b64_json", extra_body={**extra, "seed": seed + digit},
        )
        image = out.data[0]
        grey = np.asarray(Image.open(io.BytesIO(base64.b64decode(image.b64_json)))) / 255 * (GREY_LEVELS - 1)
        info = image.model_extra["sjdpp"]
        if progress is not None:
            progress.update(1)
        return Generation(digit, grey, info["forward_passes"], info["tokens"])

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
    print(f"starting VLLM_PLUGINS={PLUGINS} vllm serve {args.model.name} --speculative-config "
          f"'{json.dumps(args.spec_config)}' (log: {log_path})")
    results = {}
    serve_args = [
        "--speculative-config", json.dumps(args.spec_config),
        "--max-model-len", str(GENERATED_LENGTH + 64), "--max-num-seqs", "32",
    ]
    with vllm_server(args.model, serve_args, log_path, env={"VLLM_PLUGINS": PLUGINS}) as base:
        for name, plain in (("plain", True), ("SJD++", False)):
            with tqdm(total=10, unit="image", desc=f"{name:>5} digits 0-9") as bar:
                start = time.perf_counter()
                gens = generate_digits(base, str(args.model), plain, args.seed, args.guidance_scale, bar)
                results[name] = (gens, time.perf_counter() - start)
    print("server stopped")

    to_png([g.image for g in results["SJD++"][0] + results["plain"][0]], args.out, columns=10)
    scale = args.guidance_scale
    if scale is None:
        scale = json.loads((args.model / "generation_config.json").read_text()).get("guidance_scale", 1.0)
    print(f"wrote {args.out} (top row: SJD++, bottom row: plain decoding; guidance scale {scale})")
    j = judge()
    print(f"{'mode':<6} {'tokens/image':>12} {'passes/image':>12} {'wall s':>7} {'class acc':>9}")
    passes = {}
    for name, (gens, wall) in results.items():
        passes[name] = sum(g.forward_passes for g in gens) / len(gens)
        tokens = sum(g.tokens for g in gens) / len(gens)
        acc = j.accuracy([g.image for g in gens], [g.digit for g in gens])
        print(f"{name:<6} {tokens:>12.0f} {passes[name]:>12.1f} {wall:>7.1f} {acc:>9.0%}")
    print(f"SJD++ speed-up over plain decoding, same run: {passes['plain'] / passes['SJD++']:.2f}x fewer forward "
          f"passes, {results['plain'][1] / results['SJD++'][1]:.2f}x wall time")

if __name__ == "__main__":
    main()
