"""Present values are checked, never replaced: a value a client sends that is falsy ("", 0,
false, [], {}, or null where null is not the documented default) is used as given or refused
with a 400 naming its field in OpenAI's error shape; only an absent field takes its default.

The images endpoint runs here on its real route with a fake engine (no server, no model): the
engine records each request's SamplingParams and checks the per-request options as the patched
vLLM does (vllm_patches: SJDPPConfig.for_request and request_guidance, their ValueError a
VLLMValidationError naming `vllm_xargs`).  tests/test_images_api.py checks a few of these
against `vllm serve`."""

from __future__ import annotations

import types

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from vllm.exceptions import VLLMValidationError

from vllm_sjdpp.serving import client as image_client
from vllm_sjdpp.config import SJDPPConfig
from vllm_sjdpp.families.base import ImageFamily
from vllm_sjdpp.families.rule import UnconditionalRule
from vllm_sjdpp.guidance.cfg import request_guidance
from vllm_sjdpp.serving.images_api import ROUTE, ImagesEndpoint, ImageService

MODEL = "digits"
TOKENS = 6
PROMPT_IDS = [0, 5, 6]
DEFAULTS = {"temperature": 1.0, "top_k": 11}  # as the digit model's generation_config.json
SCALE_DEFAULT = 3.0
RULE = UnconditionalRule(frozenset({0}), 47)
VOCAB = 100


class FakeFamily(ImageFamily):
    """A family of one size (the base class's sizes and token counts), with no folder."""

    image_size = (32, 32)
    tokens_per_image = TOKENS

    def __init__(self):
        pass

    def prompt_ids(self, text: str, size=None) -> list[int]:
        return list(PROMPT_IDS)

    def to_image(self, tokens, size=None):
        return Image.new("L", self.image_size)

    to_partial_image = to_image


class FakeEngine:
    def __init__(self):
        self.params = []

    async def generate(self, prompt, params, request_id):
        self.params.append(params)
        try:
            SJDPPConfig(num_speculative_tokens=8).for_request(params.extra_args)
            request_guidance(params.extra_args, prompt["prompt_token_ids"], RULE, SCALE_DEFAULT, VOCAB)
        except ValueError as e:
            raise VLLMValidationError(str(e), parameter="vllm_xargs", value=params.extra_args) from None
        for n in range(1, TOKENS + 1):
            completion = types.SimpleNamespace(token_ids=list(range(n)), spec_decode_metrics=None)
            yield types.SimpleNamespace(outputs=[completion], finished=n == TOKENS)


@pytest.fixture
def engine():
    return FakeEngine()


@pytest.fixture
def http(engine):
    app = FastAPI()
    ImagesEndpoint().attach_router(app)
    app.state.sjdpp_images = ImageService(engine, FakeFamily(), [MODEL], dict(DEFAULTS))
    with TestClient(app) as c:
        yield c


def post(http, **fields):
    return http.post(ROUTE, json={"prompt": "a handwritten 1", **fields})


FALSY_REFUSED = [
    ({"size": ""}, "size"),
    ({"size": 0}, "size"),
    ({"size": False}, "size"),
    ({"size": []}, "size"),
    ({"size": {}}, "size"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"model": ""}, "model"),
    ({"n": 0}, "n"),
    ({"n": False}, "n"),
    ({"n": []}, "n"),
    ({"response_format": ""}, "response_format"),
    ({"output_format": ""}, "output_format"),
    ({"stream": 0}, "stream"),
    ({"stream": ""}, "stream"),
    ({"partial_images": False}, "partial_images"),
    ({"seed": False}, "seed"),
    ({"seed": ""}, "seed"),
    ({"temperature": False}, "temperature"),
    ({"temperature": ""}, "temperature"),
    ({"top_k": []}, "top_k"),
    # Checked by the engine (vLLM's SamplingParams, the SJD++ and guidance options): the 400
    # names the body's field, not the completions API's `vllm_xargs`.
    ({"top_p": 0}, "top_p"),
    ({"guidance_scale": None}, "guidance_scale"),
    ({"guidance_scale": False}, "guidance_scale"),
    ({"guidance_scale": ""}, "guidance_scale"),
    ({"sjdpp_disable": None}, "sjdpp_disable"),
    ({"sjdpp_disable": ""}, "sjdpp_disable"),
    ({"sjdpp_num_speculative_tokens": 0}, "sjdpp_num_speculative_tokens"),
    ({"sjdpp_num_speculative_tokens": None}, "sjdpp_num_speculative_tokens"),
    ({"sjdpp_fresh_token_ids": []}, "sjdpp_fresh_token_ids"),
    ({"sjdpp_fresh_token_range": []}, "sjdpp_fresh_token_range"),
    ({"sjdpp_threshold": 0}, "sjdpp_threshold"),
    ({"sjdpp_reuse": ""}, "sjdpp_reuse"),
    ({"sjdpp_init": ""}, "sjdpp_init"),
    ({"sjdpp_row_width": 0}, "sjdpp_row_width"),
    ({"sjdpp_jacobi_start": None}, "sjdpp_jacobi_start"),
    ({"sjdpp_colour": 0}, "sjdpp_colour"),
    ({"sjdpp_disable": False, "sjdpp_num_speculative_tokens": 0}, "sjdpp_num_speculative_tokens"),
]


@pytest.mark.parametrize("fields, param", FALSY_REFUSED)
def test_a_falsy_value_is_refused_naming_its_field(http, fields, param):
    answer = post(http, **fields)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, None)
    assert param in error["message"]


def test_an_engine_refusal_while_streaming_names_the_field(http):
    answer = post(http, stream=True, partial_images=1, sjdpp_fresh_token_ids=[])
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "sjdpp_fresh_token_ids"


def test_absent_fields_take_their_defaults(http, engine):
    answer = post(http)
    assert answer.status_code == 200, answer.text
    assert answer.json()["size"] == "32x32" and len(answer.json()["data"]) == 1
    (params,) = engine.params
    assert (params.extra_args, params.temperature, params.top_k) == (None, 1.0, 11)
    # No seed given: the server draws one and reports it.
    assert isinstance(params.seed, int) and answer.json()["data"][0]["sjdpp"]["seed"] == params.seed


@pytest.mark.parametrize("fields", [{"size": None}, {"n": None}, {"partial_images": None},
                                    {"response_format": None}, {"model": None}, {"seed": None}])
def test_null_where_it_is_the_documented_default(http, fields):
    """OpenAI documents null for size ("auto"), n (1), partial_images (0), response_format and
    model; vLLM for seed (none given: the server draws one and reports it)."""
    answer = post(http, **fields)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["data"]) == 1 and isinstance(answer.json()["data"][0]["sjdpp"]["seed"], int)


def test_seed_zero_is_a_seed(http, engine):
    answer = post(http, n=2, seed=0)
    assert answer.status_code == 200, answer.text
    assert sorted(p.seed for p in engine.params) == [0, 1]
    assert [d["sjdpp"]["seed"] for d in answer.json()["data"]] == [0, 1]


def test_zero_sampling_values_are_used(http, engine):
    assert post(http, temperature=0).status_code == 200
    assert post(http, temperature=1, top_k=0).status_code == 200
    greedy, all_tokens = engine.params
    assert greedy.temperature == 0 and all_tokens.top_k == 0  # not the model's 1.0 and 11


def test_falsy_per_request_options_reach_the_engine(http, engine):
    sent = {"guidance_scale": 0, "sjdpp_disable": False, "sjdpp_jacobi_start": 0}
    assert post(http, **sent).status_code == 200
    (params,) = engine.params
    assert params.extra_args == sent
    scale, _ = request_guidance(params.extra_args, PROMPT_IDS, RULE, SCALE_DEFAULT, VOCAB)
    assert scale == 0.0  # the unconditional model, not the default 3.0


def test_partial_images_zero_and_stream_false(http):
    events = post(http, stream=True, partial_images=0)
    assert events.status_code == 200 and events.headers["content-type"].startswith("text/event-stream")
    assert [line for line in events.text.splitlines() if line.startswith("event:")] == [
        "event: image_generation.completed"]
    plain = post(http, stream=False)
    assert plain.status_code == 200 and plain.headers["content-type"] == "application/json"


def test_request_guidance_null_negative_prompt_is_refused():
    """Absent: the model's rule; null, [] or a wrong length: refused, naming the option."""
    assert request_guidance({}, PROMPT_IDS, RULE, SCALE_DEFAULT, VOCAB) == (SCALE_DEFAULT, [0, 47, 47])
    assert request_guidance({"guidance_scale": 0}, PROMPT_IDS, RULE, SCALE_DEFAULT, VOCAB)[0] == 0.0
    for negative in (None, [], ""):
        with pytest.raises(ValueError, match="negative_prompt_token_ids"):
            request_guidance({"negative_prompt_token_ids": negative}, PROMPT_IDS, RULE, SCALE_DEFAULT, VOCAB)
    with pytest.raises(ValueError, match="negative_prompt_token_ids"):  # an unguided model
        request_guidance({"negative_prompt_token_ids": None}, PROMPT_IDS, None, 1.0, VOCAB)


def test_per_request_sjdpp_options_falsy_values():
    server = SJDPPConfig(num_speculative_tokens=8, jacobi_start=5, fresh_token_range=(10, 20))
    assert server.for_request({"sjdpp_jacobi_start": 0}).jacobi_start == 0
    assert server.for_request({"sjdpp_disable": False}) == server
    for key, value in [("num_speculative_tokens", 0), ("fresh_token_ids", []), ("fresh_token_range", []),
                       ("threshold", 0), ("disable", None), ("reuse", ""), ("init", ""), ("row_width", 0)]:
        with pytest.raises(ValueError, match=f"sjdpp_{key}"):
            server.for_request({f"sjdpp_{key}": value})


def test_client_keeps_zero_seed_and_scale():
    body = image_client.completion_request(FakeFamily(), "a handwritten 1", seed=0, guidance_scale=0)
    assert body["seed"] == 0 and body["extra_body"]["vllm_xargs"] == {"guidance_scale": 0}


def test_client_refuses_an_empty_served_model_name(monkeypatch, capsys):
    called = []
    monkeypatch.setattr(image_client, "generate_images", lambda *a, **k: called.append(a) or [])
    with pytest.raises(SystemExit) as e:
        image_client.main(["--model", "folder", "--served-model-name", "", "a handwritten 1"])
    assert e.value.code == 2 and not called and "--served-model-name" in capsys.readouterr().err
