"""`vllm serve <tiny Lumina-mGPT> --speculative-config sjdpp` with the images endpoint and the
user's VQGAN named by $SJDPP_CHAMELEON_VQGAN, as users run it: text prompts become PNGs of the
asked size; bad sizes are 400s naming `size`."""

from __future__ import annotations

import os

import pytest

from openai_images import client_for, png
from tiny_llama import ENGINE_ENV
from vllm_sjdpp.serving.server import vllm_server


@pytest.fixture(scope="module")
def server(tiny_lumina_path, tmp_path_factory):
    from tiny_lumina import build_tiny_vqgan
    from vllm_sjdpp.families.lumina import VQGAN_ENV

    vqgan = build_tiny_vqgan(tmp_path_factory.mktemp("vqgan"))
    env = {**os.environ, **ENGINE_ENV, "SJDPP_LOG_INTERVAL_S": "0", "VLLM_PLUGINS": "sjdpp,sjdpp_images", VQGAN_ENV: str(vqgan)}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = None
    args = ["--speculative-config", '{"method": "sjdpp", "num_speculative_tokens": 8}', "--enforce-eager",
            "--max-model-len", "512", "--max-num-seqs", "8", "--max-num-batched-tokens", "256", "--dtype", "float32"]
    log_path = tmp_path_factory.mktemp("serve-lumina") / "server.log"
    with vllm_server(tiny_lumina_path, args, log_path, env=env, timeout_s=240) as base:
        yield base


def test_pngs_of_the_asked_size_and_bad_sizes_refused(server, tiny_lumina_path):
    import openai

    client = client_for(server)
    out = client.images.generate(model=tiny_lumina_path, prompt="a red cat", n=2, size="64x96", extra_body={"seed": 3})
    images = [png(d.b64_json) for d in out.data]
    assert [i.size for i in images] == [(64, 96)] * 2 and out.size == "64x96"
    assert all(d.model_extra["sjdpp"]["tokens"] == 6 * 5 + 1 for d in out.data)  # 6 rows of 4 codes, closed
    assert images[0].tobytes() != images[1].tobytes()  # two seeds
    for size in ("100x64", "1024x1024"):  # not in 32-px steps; past the 512-token context
        with pytest.raises(openai.BadRequestError) as e:
            client.images.generate(model=tiny_lumina_path, prompt="a tree", size=size)
        assert e.value.status_code == 400 and e.value.body["param"] == "size"
