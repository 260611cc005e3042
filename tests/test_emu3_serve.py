"""`vllm serve <tiny Emu3> --speculative-config sjdpp` with the images endpoint, as users run it:
text prompts become PNGs of the asked size, with Emu3's documented negative prompt by default or
the body's `negative_prompt`; bad sizes, prompts and negative prompts are 400s naming the field."""

from __future__ import annotations

import os

import numpy as np
import pytest

from openai_images import client_for, png
from tiny_llama import ENGINE_ENV, SEED_PROBE_ON
from vllm_sjdpp.serving.server import vllm_server


@pytest.fixture(scope="module")
def server(tiny_emu3_path, tmp_path_factory):
    env = {**os.environ, **ENGINE_ENV, **SEED_PROBE_ON, "SJDPP_LOG_INTERVAL_S": "0", "VLLM_PLUGINS": "sjdpp,sjdpp_images"}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = None
    args = ["--speculative-config", '{"method": "sjdpp", "num_speculative_tokens": 8}', "--enforce-eager",
            "--max-model-len", "512", "--max-num-seqs", "8", "--max-num-batched-tokens", "256", "--dtype", "float32"]
    log_path = tmp_path_factory.mktemp("serve-emu3") / "server.log"
    with vllm_server(tiny_emu3_path, args, log_path, env=env, timeout_s=240) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return client_for(server)


def test_pngs_of_the_asked_size(client, tiny_emu3_path):
    out = client.images.generate(model=tiny_emu3_path, prompt="a red cat", n=2, size="40x32", extra_body={"seed": 3})
    images = [png(d.b64_json) for d in out.data]
    assert [i.size for i in images] == [(40, 32)] * 2 and out.size == "40x32"
    assert all(d.model_extra["sjdpp"]["tokens"] == 4 * 6 + 3 for d in out.data)  # 4 rows of 5 codes, closed
    # The seed probe ran at Emu3-Gen's vocabulary, in float32: a seed names one image here.
    assert all(d.model_extra["sjdpp"]["seed_identical"] is True for d in out.data)


def test_the_documented_negative_prompt_is_the_default(client, tiny_emu3_path):
    """Without `negative_prompt` the endpoint sends Emu3's documented one: the same image as
    naming it; another negative prompt gives another image."""
    from vllm_sjdpp.families.emu3 import NEGATIVE_PROMPT

    kw = dict(model=tiny_emu3_path, prompt="two boats", size="32x32")
    default = client.images.generate(**kw, extra_body={"seed": 5})
    named = client.images.generate(**kw, extra_body={"seed": 5, "negative_prompt": NEGATIVE_PROMPT})
    other = client.images.generate(**kw, extra_body={"seed": 5, "negative_prompt": "blur"})
    assert default.data[0].b64_json == named.data[0].b64_json
    assert not np.array_equal(np.asarray(png(other.data[0].b64_json)), np.asarray(png(default.data[0].b64_json)))


@pytest.mark.parametrize("kw, param", [
    (dict(size="41x40"), "size"),
    (dict(size="0x0"), "size"),
    (dict(size="800x800"), "size"),  # 100 x 100 codes: past the 512-token context
    (dict(prompt=""), "prompt"),
    (dict(extra_body={"negative_prompt": ""}), "negative_prompt"),
])
def test_bad_input_is_a_400_naming_it(client, tiny_emu3_path, kw, param):
    import openai

    body = {"prompt": "a tree", **kw}
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model=tiny_emu3_path, **body)
    assert e.value.status_code == 400 and e.value.body["param"] == param
