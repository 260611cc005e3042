"""The images endpoint (`POST /v1/images/generations`, vllm_sjdpp.serving.images_api) against `vllm
serve` of the bundled digit model with SJD++ and `VLLM_PLUGINS=sjdpp,sjdpp_images`, through the
real openai client."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os

import httpx
import numpy as np
import pytest

from openai_images import client_for, png
from tiny_llama import ENGINE_ENV
from vllm_sjdpp.digits.tokens import GENERATED_LENGTH
from vllm_sjdpp.digits.train import DEFAULT_OUT
from vllm_sjdpp.serving.server import vllm_server

MODEL = str(DEFAULT_OUT)
SIZE = "32x32"


@contextlib.contextmanager
def serve(tmp_path_factory, speculative: list[str]):
    env = {**os.environ, **ENGINE_ENV, "SJDPP_LOG_INTERVAL_S": "0", "VLLM_PLUGINS": "sjdpp,sjdpp_images"}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = None
    # float32: the tests below compare PNGs with SJD++ on and off, which needs a forward that rounds
    # wide and narrow passes alike; bf16 does not on every CPU (on AMX, 19 of 39 window rows
    # differ, and this module's bench test saw 2 of 3 seeds give the same PNG).
    args = [*speculative, "--dtype", "float32", "--max-model-len", str(GENERATED_LENGTH + 64), "--max-num-seqs", "32"]
    log_path = tmp_path_factory.mktemp("serve-images") / "server.log"
    with vllm_server(MODEL, args, log_path, env=env, timeout_s=240) as base:
        yield base


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # Full windows: under "auto" a busy 2-core machine may draft nothing at 4 images, and the
    # tests below check that SJD++ is at work.
    with serve(tmp_path_factory, ["--speculative-config", '{"method": "sjdpp", "draft_token_budget": null}']) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return client_for(server)


def test_n_images_of_the_stated_size(client):
    out = client.images.generate(model=MODEL, prompt="a handwritten 3", n=4, size=SIZE, response_format="b64_json",
                                 extra_body={"seed": 1})
    images = [png(d.b64_json) for d in out.data]
    assert len(images) == 4 and all(i.size == (32, 32) for i in images)
    assert len({i.tobytes() for i in images}) == 4  # four different images
    for d in out.data:
        info = d.model_extra["sjdpp"]
        assert info["tokens"] == GENERATED_LENGTH and info["forward_passes"] < GENERATED_LENGTH  # SJD++ at work
        assert info["tokens_per_pass"] == pytest.approx(GENERATED_LENGTH / info["forward_passes"], abs=1e-3)
    assert out.usage.output_tokens == 4 * GENERATED_LENGTH and out.usage.input_tokens == 4 * 5
    plain = client.images.generate(model=MODEL, prompt="a handwritten 3", extra_body={"seed": 1, "sjdpp_disable": True})
    assert plain.data[0].model_extra["sjdpp"]["forward_passes"] == GENERATED_LENGTH


def test_a_seed_reproduces_its_images(client):
    kw = dict(model=MODEL, prompt="a handwritten 8", n=2, extra_body={"seed": 42, "temperature": 1.0})
    first, again = client.images.generate(**kw), client.images.generate(**kw)
    assert [d.b64_json for d in first.data] == [d.b64_json for d in again.data]
    assert [d.model_extra["sjdpp"]["seed"] for d in first.data] == [42, 43]


def test_without_a_seed_the_server_draws_one_and_says_which(client):
    out = client.images.generate(model=MODEL, prompt="a handwritten 8", n=2, response_format="b64_json")
    seeds = [d.model_extra["sjdpp"]["seed"] for d in out.data]
    assert isinstance(seeds[0], int) and seeds[1] == seeds[0] + 1
    assert len({png(d.b64_json).tobytes() for d in out.data}) == 2
    again = client.images.generate(model=MODEL, prompt="a handwritten 8", response_format="b64_json",
                                   extra_body={"seed": seeds[1]})
    assert again.data[0].b64_json == out.data[1].b64_json  # the reported seed makes it again


def test_a_seed_names_one_png_with_or_without_sjdpp_at_any_load(tmp_path_factory, client):
    """n = 4 seeded images from the SJD++ server while 12 unseeded images load it, with SJD++
    and with sjdpp_disable, and from a server started without --speculative-config: the same
    bytes."""
    kw = dict(model=MODEL, prompt="a handwritten 2", n=4, response_format="b64_json")

    def pngs(c, **extra):
        return [d.b64_json for d in c.images.generate(**kw, extra_body={"seed": 2024, **extra}).data]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        load = [pool.submit(client.images.generate, model=MODEL, prompt=f"a handwritten {d % 10}") for d in range(12)]
        drafting, disabled = pool.submit(pngs, client), pool.submit(pngs, client, sjdpp_disable=True)
        drafting, disabled = drafting.result(), disabled.result()
        for f in load:
            f.result()
    assert drafting == disabled and len(set(drafting)) == 4
    from openai import OpenAI

    with serve(tmp_path_factory, []) as base:
        plain = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
        assert pngs(plain) == drafting


def test_streaming_partial_images_then_the_final_one(client):
    stream = client.images.generate(model=MODEL, prompt="a handwritten 5", stream=True, partial_images=2,
                                    extra_body={"seed": 9})
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    partial, final = [np.asarray(png(e.b64_json)) for e in events[:2]], png(events[-1].b64_json)
    assert (partial[0] == 128).mean() > (partial[1] == 128).mean() > (np.asarray(final) == 128).mean()  # rows fill in
    same = client.images.generate(model=MODEL, prompt="a handwritten 5", extra_body={"seed": 9})
    assert events[-1].b64_json == same.data[0].b64_json


@pytest.mark.parametrize("kw, param", [
    (dict(prompt=""), "prompt"),
    (dict(prompt="a handwritten 1", n=0), "n"),
    (dict(prompt="a handwritten 1", n=11), "n"),
    (dict(prompt="a handwritten 1", size="64x64"), "size"),
    (dict(prompt="a handwritten 1", response_format="url"), "response_format"),
    (dict(prompt="a handwritten 1", extra_body={"sjdpp_reuse": "sometimes"}), "sjdpp_reuse"),
    (dict(prompt="a handwritten 1", extra_body={"guidance_scale": -1}), "guidance_scale"),
    (dict(prompt="a handwritten 1", extra_body={"top_k": -7}), "top_k"),
    (dict(prompt="a handwritten 1", extra_body={"temperature": "hot"}), "temperature"),
    (dict(prompt="a handwritten 1", extra_body={"colour": "red"}), "colour"),
    (dict(prompt="a red fox"), "handwritten"),
])
def test_bad_input_is_a_400_in_openai_shape(client, kw, param):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model=MODEL, **kw)
    assert e.value.status_code == 400 and param in str(e.value.body)
    assert e.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize("kw, param", [
    (dict(size=""), "size"),
    (dict(extra_body={"sjdpp_num_speculative_tokens": 0}), "sjdpp_num_speculative_tokens"),
    (dict(extra_body={"guidance_scale": None}), "guidance_scale"),
])
def test_a_falsy_value_is_refused_naming_its_field(client, kw, param):
    """Present values are checked, never replaced by a default (tests/test_request_values.py has
    the full list, against a fake engine)."""
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model=MODEL, prompt="a handwritten 1", **kw)
    assert e.value.status_code == 400 and e.value.body["param"] == param
    assert e.value.body["type"] == "invalid_request_error"


def test_seed_zero_and_guidance_scale_zero_are_used(client):
    kw = dict(model=MODEL, prompt="a handwritten 4")
    zero, again = (client.images.generate(**kw, extra_body={"seed": 0, "guidance_scale": 0}) for _ in range(2))
    guided = client.images.generate(**kw, extra_body={"seed": 0})  # the model's scale, 3
    assert zero.data[0].model_extra["sjdpp"]["seed"] == 0
    assert zero.data[0].b64_json == again.data[0].b64_json  # seed 0 is a seed
    assert zero.data[0].b64_json != guided.data[0].b64_json  # scale 0 (the unconditional model) is applied


def test_negative_prompt_is_the_unconditional_context(client):
    """The negative prompt goes through the family's prompt template: the prompt itself as the
    negative prompt makes guidance a no-op (l_u = l_c), so the image equals scale 1's; another
    class's gives another image than the folder's rule."""
    kw = dict(model=MODEL, prompt="a handwritten 3")
    itself = client.images.generate(**kw, extra_body={"seed": 7, "negative_prompt": "a handwritten 3"})
    unguided = client.images.generate(**kw, extra_body={"seed": 7, "guidance_scale": 1})
    other = client.images.generate(**kw, extra_body={"seed": 7, "negative_prompt": "a handwritten 5"})
    rule = client.images.generate(**kw, extra_body={"seed": 7})
    assert itself.data[0].b64_json == unguided.data[0].b64_json
    assert len({other.data[0].b64_json, rule.data[0].b64_json, unguided.data[0].b64_json}) == 3


@pytest.mark.parametrize("negative", ["", "a red fox", 5, ["a handwritten 5"]])
def test_a_bad_negative_prompt_is_a_400_naming_it(client, negative):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model=MODEL, prompt="a handwritten 1", extra_body={"negative_prompt": negative})
    assert e.value.status_code == 400 and e.value.body["param"] == "negative_prompt"


def test_32_concurrent_requests_with_disconnecting_clients(server, client):
    """One in ten clients hangs up early; the others complete, the server stays healthy and no
    request is left in the engine."""

    def one(i: int):
        if i % 10 == 0:
            with pytest.raises(httpx.TimeoutException):
                httpx.post(server + "/v1/images/generations", json={"prompt": "a handwritten 0", "seed": i}, timeout=0.5)
            return None
        return client.images.generate(model=MODEL, prompt=f"a handwritten {i % 10}", extra_body={"seed": i})

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    done = [r for r in results if r is not None]
    assert len(done) == 28 and all(png(r.data[0].b64_json).size == (32, 32) for r in done)
    assert httpx.get(server + "/health", timeout=10).status_code == 200
    metrics = httpx.get(server + "/metrics", timeout=10).text
    left = [line for line in metrics.splitlines()
            if line.startswith(("vllm:num_requests_running{", "vllm:num_requests_waiting{"))]
    assert left and all(float(line.rsplit(" ", 1)[1]) == 0 for line in left), left


def test_bench_measures_plain_against_sjdpp(server):
    """`python -m vllm_sjdpp.bench` on this server: plain images take a pass per token, SJD++
    fewer; every seed gives one PNG both ways (bench.summarize's own failure cases: test_cli)."""
    from vllm_sjdpp import bench

    record = bench.bench(server, {"prompt": "a handwritten 5", "size": SIZE}, images=2, in_flight=3, seed=40,
                         rounds=1, progress=False, waves=1)
    s = record["summary"]
    assert s["passes_per_image"]["plain"] == GENERATED_LENGTH and s["passes_per_image"]["sjdpp"] < GENERATED_LENGTH
    assert (s["identical_pngs"], s["seeds_compared"]) == (3, 3)
    assert len(record["latency_runs"]) == 4 and len(record["throughput_runs"]["sjdpp"]["runs"]) == 3
    assert all(r["seconds"] > 0 for r in record["latency_runs"])
    assert record["provenance"]["cpu"] and record["provenance"]["versions"]["vllm_sjdpp"]
