"""`vllm serve <Janus folder> --speculative-config sjdpp` as users run it: a text prompt becomes a
PNG through the client helper (`vllm_sjdpp.serving.client`), on the tiny random Janus folders: the small
one and one with Janus-Pro's real ids and shapes (tests/tiny_janus.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tiny_janus import SMALL
from tiny_llama import ENGINE_ENV, SEED_PROBE_ON
from vllm_sjdpp.serving.server import vllm_server


def serve_args(janus_shape) -> list[str]:
    # Seeded images keep full windows, and on Janus-Pro's 16384 codes every window row costs a
    # pass over them on 2 cores: windows of 8 there.
    spec = "sjdpp" if janus_shape is SMALL else '{"method": "sjdpp", "num_speculative_tokens": 8}'
    return [
        "--speculative-config", spec, "--skip-tokenizer-init", "--enforce-eager",
        "--max-model-len", str(64 + janus_shape.tokens), "--max-num-seqs", "64", "--dtype", "float32",
    ]


@pytest.fixture(scope="module")
def server(janus_folder, janus_shape, tmp_path_factory):
    env = {**os.environ, **ENGINE_ENV, **SEED_PROBE_ON, "SJDPP_LOG_INTERVAL_S": "0", "VLLM_PLUGINS": "sjdpp,sjdpp_images"}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = None  # the server runs as users run it
    log_path = tmp_path_factory.mktemp("serve-janus") / "server.log"
    with vllm_server(janus_folder, serve_args(janus_shape), log_path, env=env, timeout_s=240) as base:
        yield base


def test_text_prompt_to_png(server, janus_folder, janus_shape, tmp_path):
    from PIL import Image

    out = tmp_path / "images.png"
    cmd = [sys.executable, "-m", "vllm_sjdpp.serving.client", "--url", server, "--model", janus_folder,
           "--n", "3", "--seed", "1", "--out", str(out), "a red dog under the sun"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size == (3 * janus_shape.image_size, janus_shape.image_size)


def test_client_helper_images_tokens_and_seeds(server, janus_folder, janus_shape):
    """Images are the tokens decoded; a seed repeats them; greedy at the folder's default guidance
    scale (generation_config.json) equals transformers' Janus."""
    from transformers import JanusForConditionalGeneration

    from vllm_sjdpp import families
    from vllm_sjdpp.serving.client import generate_images

    family = families.load(janus_folder)
    text = "the big green tree"
    first = generate_images(server, janus_folder, janus_folder, [text], n=2, seed=7)
    again = generate_images(server, janus_folder, janus_folder, [text], n=2, seed=7)
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    assert first[0].token_ids != first[1].token_ids
    for g in first:
        assert len(g.token_ids) == janus_shape.tokens and g.image.size == (janus_shape.image_size, janus_shape.image_size)
        assert g.image.tobytes() == family.to_image(g.token_ids).tobytes()

    hf = JanusForConditionalGeneration.from_pretrained(janus_folder).eval()
    prompt = torch.tensor([family.prompt_ids(text)])
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), generation_mode="image", do_sample=False)
    greedy = generate_images(server, janus_folder, janus_folder, [text], temperature=0)
    assert greedy[0].token_ids == expected[0].tolist()


def test_prompt_too_long_for_the_context_is_refused(server, janus_folder):
    import openai

    from vllm_sjdpp.serving.client import generate_images

    with pytest.raises(openai.APIError, match="context length"):  # refused inside the stream
        generate_images(server, janus_folder, janus_folder, ["a big red dog under the sun " * 10])
    assert len(generate_images(server, janus_folder, janus_folder, ["a cat"])) == 1  # still serving


def test_images_endpoint_makes_janus_pngs(server, janus_folder, janus_shape):
    """The images endpoint with the Janus family: the server makes the prompt and decodes the
    image; greedy at scale 2 is transformers' image decoded by the folder's VQ model."""
    import base64
    import io

    from openai import OpenAI
    from PIL import Image
    from transformers import JanusForConditionalGeneration

    from vllm_sjdpp import families

    client = OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=300)
    out = client.images.generate(model=janus_folder, prompt="a small cat", n=2, size=f"{janus_shape.image_size}x{janus_shape.image_size}",
                                 extra_body={"seed": 3})
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in out.data]
    assert [i.size for i in images] == [(janus_shape.image_size, janus_shape.image_size)] * 2 and images[0].tobytes() != images[1].tobytes()
    assert all(d.model_extra["sjdpp"]["tokens"] == janus_shape.tokens for d in out.data)

    greedy = client.images.generate(model=janus_folder, prompt="a small cat", extra_body={"temperature": 0})
    family = families.load(janus_folder)
    hf = JanusForConditionalGeneration.from_pretrained(janus_folder).eval()
    prompt = torch.tensor([family.prompt_ids("a small cat")])
    codes = hf.generate(prompt, attention_mask=torch.ones_like(prompt), generation_mode="image", do_sample=False)[0]
    got = Image.open(io.BytesIO(base64.b64decode(greedy.data[0].b64_json)))
    assert got.tobytes() == family.to_image(codes.tolist()).tobytes()


def rows_invariant(linear, shapes: list[tuple[int, int]]) -> bool:
    """Whether `linear(x, w)` gives a row the same bits alone and among 16 others at each
    (in, out) shape, in float32 on this machine."""
    gen = torch.Generator().manual_seed(0)
    for k, n in shapes:
        x, w = torch.randn(17, k, generator=gen), torch.randn(n, k, generator=gen)
        if not torch.equal(linear(x, w)[:1], linear(x[:1], w)):
            return False
    return True


def vllm_cpu_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """vLLM's CPU GEMM for an unquantized linear layer of weight `w` (what its linear layers run)."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(w, requires_grad=False)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    return layer.cpu_linear(x, w, None)


def test_the_seed_probe_ran_at_the_folders_shapes(server, janus_folder):
    """The start-up seed probe runs on Janus (text prompt, image codes, both branches) and reports
    what this machine's kernels do: Janus's generation aligner and head are vLLM's linear layers, as
    the Llama's are, so a seed names one image where vLLM's GEMM gives a row the same bits in a
    one-row and a wide pass.  On a machine where torch's own float32 linear does not (MKL / oneDNN
    pick kernels by the row count: this CPU), transformers' modules would have broken the promise."""
    from transformers import AutoConfig
    from vllm.platforms import current_platform

    from openai_images import client_for

    if not current_platform.is_cpu():
        pytest.skip("the expected verdict is computed with vLLM's CPU GEMM")
    config = AutoConfig.from_pretrained(janus_folder)
    vq, text = config.vq_config, config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    shapes = [  # (in, out) of every linear layer: the generation aligner and head, the Llama's
        (vq.embed_dim, vq.projection_dim), (vq.projection_dim, vq.projection_dim),
        (vq.image_token_embed_dim, vq.projection_dim), (vq.projection_dim, vq.num_embeddings),
        (text.hidden_size, (text.num_attention_heads + 2 * kv_heads) * head_dim),
        (text.num_attention_heads * head_dim, text.hidden_size),
        (text.hidden_size, 2 * text.intermediate_size), (text.intermediate_size, text.hidden_size),
    ]
    out = client_for(server).images.generate(model=janus_folder, prompt="a small house", extra_body={"seed": 2})
    assert out.data[0].model_extra["sjdpp"]["seed_identical"] is rows_invariant(vllm_cpu_linear, shapes)
