"""Text to images through a running `vllm serve` of an image model (any family in
`vllm_sjdpp.families`): the family makes the prompt's token ids and decodes the image tokens
here, on the client; the server's OpenAI-compatible completions endpoint samples the tokens.

    python -m vllm_sjdpp.serving.client --url http://localhost:8000 --model FOLDER "a red fox in snow" \\
        [--n 4] [--seed 0] [--guidance-scale 5] [--out images.png]

The folder must be the one the server serves (or a copy): the client reads its processor,
chat template and image decoder, the server its weights.
"""

from __future__ import annotations

import argparse
import concurrent.futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import families


@dataclass
class GeneratedImage:
    prompt: str
    token_ids: list[int]
    image: Any  # PIL.Image.Image


def completion_request(family: families.ImageFamily, text: str, n: int = 1, seed: int | None = None,
                       guidance_scale: float | None = None, xargs: dict | None = None, **sampling) -> dict:
    """The completions request body (OpenAI client keywords) for `n` images of `text`."""
    extra = dict(xargs or {})
    if guidance_scale is not None:
        extra["guidance_scale"] = guidance_scale
    body = dict(
        prompt=family.prompt_ids(text), n=n, max_tokens=family.tokens_per_image, seed=seed,
        extra_body={"return_token_ids": True, "ignore_eos": True, "vllm_xargs": extra, **sampling},
    )
    return body


def generate_images(base_url: str, model: str, folder: str | Path, prompts: list[str], n: int = 1,
                    seed: int | None = None, guidance_scale: float | None = None, xargs: dict | None = None,
                    **sampling) -> list[GeneratedImage]:
    """`n` images per prompt, all prompts in flight at once; raises the server's error (an
    `openai.BadRequestError` naming the problem) for a bad request."""
    from openai import OpenAI

    family = families.load(folder)
    client = OpenAI(base_url=base_url.rstrip("/") + "/v1", api_key="unused", max_retries=0, timeout=3600)

    def one(text: str) -> list[GeneratedImage]:
        out = client.completions.create(
            model=model, **completion_request(family, text, n, seed, guidance_scale, xargs, **sampling)
        )
        for c in out.choices:
            if len(c.token_ids) != family.tokens_per_image:
                raise RuntimeError(f"the server returned {len(c.token_ids)} of an image's {family.tokens_per_image} "
                                   f"tokens for {text!r} (finish reason {c.finish_reason!r})")
        return [GeneratedImage(text, list(c.token_ids), family.to_image(list(c.token_ids))) for c in out.choices]

    with concurrent.futures.ThreadPoolExecutor(max(1, min(len(prompts), 16))) as pool:
        return [image for images in pool.map(one, prompts) for image in images]


def save_grid(images: list[Any], path: str | Path, columns: int = 4) -> None:
    """PIL images of one size -> one PNG grid."""
    from PIL import Image

    if not images:
        raise ValueError("no images to write")
    width, height = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (min(columns, len(images)) * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % columns) * width, (i // columns) * height))
    grid.save(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompts", nargs="+")
    ap.add_argument("--url", default="http://localhost:8000")
    ap.add_argument("--model", required=True, help="the model folder (also the served model's name)")
    ap.add_argument("--served-model-name", default=None)
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--guidance-scale", type=float, default=None)
    ap.add_argument("--out", type=Path, default=Path("images.png"))
    args = ap.parse_args(argv)
    if args.served_model_name == "":  # given and empty: refused, not replaced by the folder
        ap.error("--served-model-name: must not be empty (omit it to use --model)")
    served = args.model if args.served_model_name is None else args.served_model_name
    images = generate_images(args.url, served, args.model, args.prompts, args.n, args.seed, args.guidance_scale)
    save_grid([g.image for g in images], args.out, columns=max(args.n, 1))
    print(f"wrote {len(images)} images to {args.out}")


if __name__ == "__main__":
    main()
