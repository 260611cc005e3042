"""Text to images through a running `vllm serve` of an image model (any family in
`vllm_sjdpp.families`): the family makes the prompt's token ids and decodes the image tokens
here, on the client; the server's OpenAI-compatible completions endpoint samples the tokens
(streamed, so a progress bar follows them).

    python -m vllm_sjdpp.serving.client --url http://localhost:8000 --model FOLDER "a red fox in snow" \\
        [--n 4] [--seed 0] [--size 768x768] [--negative-prompt TEXT] [--guidance-scale 5] \\
        [--temperature 1] [--top-k 2000] [--top-p 1] [--out images.png]

The folder must be the one the server serves (or a copy, or its hub id in the local Hugging Face
cache): the client reads its processor, chat template and image decoder, the server its weights.
Errors (a refused request, a server that does not answer, a folder no family reads) are one
line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import families
from ..guidance.cfg import NEGATIVE_PROMPT_KEY, SCALE_KEY


@dataclass
class GeneratedImage:
    prompt: str
    token_ids: list[int]
    image: Any  # PIL.Image.Image


def completion_request(family: families.ImageFamily, text: str, n: int = 1, seed: int | None = None,
                       guidance_scale: float | None = None, xargs: dict | None = None,
                       size: tuple[int, int] | None = None, negative_prompt: str | None = None,
                       **sampling) -> dict:
    """The completions request body (OpenAI client keywords) for `n` images of `text`.

    size: (width, height) in pixels from `family.parse_size`; None: the family's default.
    negative_prompt: text in the family's prompt template (the unconditional context of
    guidance); None: the family's documented one, else the server's rule.
    sampling: temperature, top_k, top_p (None values left out)."""
    extra = dict(xargs or {})
    if guidance_scale is not None:
        extra[SCALE_KEY] = guidance_scale
    negative_ids = family.negative_prompt_ids(negative_prompt, size)
    if negative_ids is not None:
        extra[NEGATIVE_PROMPT_KEY] = negative_ids
    return dict(
        prompt=family.prompt_ids(text, size), n=n, max_tokens=family.tokens_for(size), seed=seed,
        extra_body={"return_token_ids": True, "ignore_eos": True, "vllm_xargs": extra,
                    **{k: v for k, v in sampling.items() if v is not None}},
    )


def generate_images(base_url: str, model: str, folder: str | Path, prompts: list[str], n: int = 1,
                    seed: int | None = None, guidance_scale: float | None = None, xargs: dict | None = None,
                    size: str | None = None, negative_prompt: str | None = None, progress: bool | None = False,
                    **sampling) -> list[GeneratedImage]:
    """`n` images per prompt, all prompts in flight at once, in prompt order.

    size: "WxH" or "auto" (OpenAI's); progress: a bar over the tokens on stderr (None: only on
    a terminal).  Raises the server's error for a bad request, `openai.APIError` naming the
    problem (vLLM answers a streamed request's refusal inside the stream, with status 200), and
    ValueError for a size the family does not make."""
    from openai import OpenAI
    from tqdm import tqdm

    family = families.load(folder)
    pixels = family.parse_size(size)
    tokens = family.tokens_for(pixels)
    client = OpenAI(base_url=base_url.rstrip("/") + "/v1", api_key="unused", max_retries=0, timeout=3600)
    bar = tqdm(total=len(prompts) * n * tokens, unit="tok", desc="image tokens", disable=None if progress is None else not progress)
    lock = threading.Lock()

    def one(text: str) -> list[GeneratedImage]:
        body = completion_request(family, text, n, seed, guidance_scale, xargs, pixels, negative_prompt, **sampling)
        streamed: dict[int, list[int]] = {i: [] for i in range(n)}
        finish: dict[int, str | None] = {}
        for chunk in client.completions.create(model=model, stream=True, **body):
            for c in chunk.choices:
                delta = list(getattr(c, "token_ids", None) or [])
                streamed[c.index].extend(delta)
                if c.finish_reason is not None:
                    finish[c.index] = c.finish_reason
                with lock:
                    bar.update(len(delta))
        for i, ids in streamed.items():
            if len(ids) != tokens:
                raise RuntimeError(f"the server returned {len(ids)} of an image's {tokens} tokens for {text!r} "
                                   f"(finish reason {finish.get(i)!r})")
        return [GeneratedImage(text, ids, family.to_image(ids, pixels)) for _, ids in sorted(streamed.items())]

    pool = concurrent.futures.ThreadPoolExecutor(max(1, min(len(prompts), 16)))
    try:
        return [image for images in pool.map(one, prompts) for image in images]
    except BaseException:
        client.close()  # the other prompts' streams end now, not when their images are done
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()


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


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m vllm_sjdpp.serving.client", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompts", nargs="+", help="one text prompt per image group")
    ap.add_argument("--url", default="http://localhost:8000", help="the server's base URL (default: %(default)s)")
    ap.add_argument("--model", required=True, help="the model folder or cached hub id (also the served model's name)")
    ap.add_argument("--served-model-name", default=None, help="the server's --served-model-name (default: --model)")
    ap.add_argument("--n", type=int, default=1, help="images per prompt (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=None,
                    help="seed of the first image (image i: seed + i; default: none, a new image each run)")
    ap.add_argument("--size", default="auto", help="WxH in pixels, or auto, the family's default (default: %(default)s)")
    ap.add_argument("--negative-prompt", default=None,
                    help="the unconditional context of guidance, as text (default: the family's)")
    ap.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale (default: the folder's)")
    ap.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the folder's)")
    ap.add_argument("--top-k", type=int, default=None, help="sampling top-k (default: the folder's)")
    ap.add_argument("--top-p", type=float, default=None, help="sampling top-p (default: the folder's)")
    ap.add_argument("--out", type=Path, default=Path("images.png"), help="the PNG grid to write (default: %(default)s)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    if args.served_model_name == "":  # given and empty: refused, not replaced by the folder
        ap.error("--served-model-name: must not be empty (omit it to use --model)")
    if args.n < 1:
        ap.error("--n: at least 1")
    served = args.model if args.served_model_name is None else args.served_model_name
    import openai

    try:
        images = generate_images(
            args.url, served, args.model, args.prompts, args.n, args.seed, args.guidance_scale, size=args.size,
            negative_prompt=args.negative_prompt, progress=None if not args.no_progress else False,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        )
        save_grid([g.image for g in images], args.out, columns=max(args.n, 1))
    except openai.APIConnectionError:
        sys.exit(f"error: no server answers at {args.url} (is `vllm serve` running there?)")
    except openai.APIStatusError as e:
        sys.exit(f"error: the server refused the request ({e.status_code}): {_server_message(e)}")
    except openai.APIError as e:  # refused inside the stream (vLLM checks a streamed request there)
        sys.exit(f"error: the server refused the request: {_server_message(e)}")
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {len(images)} images to {args.out}")


def error_text(error: dict, fallback: str) -> str:
    """An error object in OpenAI's shape ({"message", "param", ...}) as one line: its message
    (`fallback` without one) and the parameter it names."""
    message = error.get("message") or fallback
    return f"{message} (parameter {error['param']})" if error.get("param") else message


def _server_message(error) -> str:
    body = error.body if isinstance(error.body, dict) else {}
    return error_text(body["error"] if isinstance(body.get("error"), dict) else body, str(error))


if __name__ == "__main__":
    main()
