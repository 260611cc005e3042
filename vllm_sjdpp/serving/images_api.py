"""`POST /v1/images/generations` (the OpenAI Images API) as a vLLM endpoint plugin.

Entry point `vllm.endpoint_plugins`: `sjdpp_images`.  vLLM loads endpoint plugins only when
`VLLM_PLUGINS` names them, and that variable then filters the general plugins too:

    VLLM_PLUGINS=sjdpp,sjdpp_images vllm serve MODEL --speculative-config sjdpp --skip-tokenizer-init

The served folder's image family (`vllm_sjdpp.families`) turns the prompt into token ids and the
generated tokens into PNGs, here in the API server; the engine samples the tokens, one request
per image.  Image i of a request with `seed` s uses seed s + i; without a seed the server draws
one.  A seed names one image: the same PNG with SJD++ drafting or disabled (`sjdpp_disable`), from
a server without `--speculative-config`, at any load (the position-keyed race, engine/race_sampler.py),
on a server whose forward gives a position the same logits in a wide pass as in a narrow one: the
start-up seed probe (engine/seed_probe.py) checks it and each image reports it (`seed_identical`).

Beyond OpenAI's parameters, the body (`extra_body` in the openai client) takes `guidance_scale`,
`negative_prompt` (text, in the family's prompt template: the unconditional context of guidance;
default: the family's documented one, Emu3's, else the engine's rule),
`seed`, `temperature`, `top_k`, `top_p`, any `sjdpp_*` per-request option and `sjdpp_disable`.
Each image in the response carries `sjdpp`: its seed, tokens, forward passes, tokens per pass, and
`seed_identical` (true: this seed gives this image with SJD++ on or off; false: the probe found
logits that depend on the pass's shape, so it may not; null: not probed).
With `stream: true` and `partial_images: N` the answer is server-sent events as OpenAI sends them:
N `image_generation.partial_image` events, each a PNG of the rows committed so far (rows not
generated yet are grey; SJD++ drafts are not shown: vLLM's output path carries committed tokens
only), then `image_generation.completed`.  A client that disconnects aborts its requests.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re
import secrets
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from vllm.exceptions import VLLMClientError

from ..config import ENDPOINT_PLUGIN, IMAGES_ROUTE, REQUEST_PREFIX
from ..guidance.cfg import NEGATIVE_PROMPT_KEY, SCALE_KEY

logger = logging.getLogger("vllm.sjdpp")

NAME = ENDPOINT_PLUGIN
ROUTE = IMAGES_ROUTE
MAX_IMAGES = 10  # OpenAI's limit on n
MAX_SEED = 2**63 - MAX_IMAGES  # image i of a request uses seed + i
MAX_PARTIAL_IMAGES = 3  # and on partial_images
SAMPLING_KEYS = ("temperature", "top_k", "top_p")
# OpenAI parameters accepted and not used (the output is always a PNG of the family's size).
IGNORED_KEYS = ("quality", "style", "background", "moderation", "user", "output_compression")


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def error_response(message: str, param: str | None = None, status: int = 400) -> JSONResponse:
    """OpenAI's error JSON."""
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


def png_b64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class ImageRequest:
    """The request body, checked: everything the engine does not check itself."""

    def __init__(self, body: Any, family, served_names: list[str]):
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        self.prompt = body.get("prompt")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise BadRequest("'prompt' must be a non-empty string", "prompt")
        model = body.get("model")
        if model is not None and model not in served_names:
            raise BadRequest(f"model {model!r} is not served here; served: {served_names}", "model")
        self.n = self._int(body, "n", 1, 1, MAX_IMAGES)
        size = body.get("size")  # null is OpenAI's documented default, "auto"; "" is refused
        self.size_chosen = size not in (None, "auto")
        try:
            self.pixels = family.parse_size("auto" if size is None else size)
        except ValueError as e:
            raise BadRequest(str(e), "size") from None
        self.size = "{}x{}".format(*self.pixels)
        if body.get("response_format", "b64_json") not in (None, "b64_json"):
            raise BadRequest("response_format: only 'b64_json' (images are not stored for URLs)", "response_format")
        if body.get("output_format", "png") not in (None, "png"):
            raise BadRequest("output_format: only 'png'", "output_format")
        self.stream = body.get("stream", False)
        if not isinstance(self.stream, bool):
            raise BadRequest("'stream' must be true or false", "stream")
        self.partial_images = self._int(body, "partial_images", 0, 0, MAX_PARTIAL_IMAGES)
        if self.stream and self.n != 1:
            raise BadRequest("streaming makes one image: n must be 1 with stream", "n")
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < MAX_SEED):
            raise BadRequest(f"'seed' must be an integer from 0 to {MAX_SEED - 1}", "seed")
        self.seed = seed
        self.sampling = {k: body[k] for k in SAMPLING_KEYS if body.get(k) is not None}
        for key, value in self.sampling.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise BadRequest(f"'{key}' must be a number, got {value!r}", key)
        self.extra_args = {k: v for k, v in body.items() if k.startswith(REQUEST_PREFIX) or k == SCALE_KEY}
        self.negative_prompt = body.get("negative_prompt")
        if self.negative_prompt is not None and (not isinstance(self.negative_prompt, str) or not self.negative_prompt.strip()):
            raise BadRequest("'negative_prompt' must be a non-empty string", "negative_prompt")
        known = {"prompt", "model", "n", "size", "response_format", "output_format", "stream", "partial_images",
                 "seed", "negative_prompt", *SAMPLING_KEYS, *IGNORED_KEYS, *self.extra_args}
        unknown = sorted(set(body) - known)
        if unknown:
            raise BadRequest(f"unknown parameter(s) {unknown}", unknown[0])

    @staticmethod
    def _int(body: dict, key: str, default: int, lo: int, hi: int) -> int:
        value = body.get(key, default)
        if value is None:
            return default
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise BadRequest(f"'{key}' must be an integer from {lo} to {hi}, got {value!r}", key)
        return value


class ImageService:
    """What the route does, given the engine and the served folder's family."""

    def __init__(self, engine_client, family, served_names: list[str], default_sampling: dict,
                 seed_identical: bool | None = None):
        self.engine = engine_client
        self.family = family
        self.served_names = served_names
        self.default_sampling = default_sampling
        # The start-up seed probe's verdict (engine.seed_probe): whether a seed gives the same
        # image with SJD++ on and off here; None where it was not probed.
        self.seed_identical = seed_identical

    def sampling_params(self, request: ImageRequest, seed: int | None):
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        return SamplingParams(
            **{**self.default_sampling, **request.sampling},
            n=1, seed=seed, max_tokens=self.family.tokens_for(request.pixels), ignore_eos=True, detokenize=False,
            extra_args=request.extra_args or None,
            output_kind=RequestOutputKind.CUMULATIVE if request.stream else RequestOutputKind.FINAL_ONLY,
        )

    async def generate(self, request: ImageRequest, prompt_ids: list[int], seed: int | None, request_id: str):
        """The engine's outputs for one image (cumulative when streaming)."""
        async for output in self.engine.generate(
            {"prompt_token_ids": prompt_ids}, self.sampling_params(request, seed), request_id
        ):
            yield output

    def image_entry(self, output, seed: int | None, size: tuple[int, int]) -> tuple[dict, int]:
        """One image of the response, and its tokens."""
        completion = output.outputs[0]
        tokens = list(completion.token_ids)
        metrics = completion.spec_decode_metrics
        accepted = sum(j * count for j, count in enumerate(metrics.histogram)) if metrics is not None else 0
        passes = len(tokens) - accepted  # each pass commits its accepted drafts and one token
        image = self.family.to_image(tokens, size)
        entry = {
            "b64_json": png_b64(image), "revised_prompt": None,
            "sjdpp": {"seed": seed, "tokens": len(tokens), "forward_passes": passes,
                      "tokens_per_pass": round(len(tokens) / max(passes, 1), 3),
                      "seed_identical": self.seed_identical},
        }
        return entry, len(tokens)

    @staticmethod
    def usage(prompt_tokens: int, n: int, output_tokens: int) -> dict:
        return {
            "input_tokens": prompt_tokens * n, "output_tokens": output_tokens,
            "total_tokens": prompt_tokens * n + output_tokens,
            "input_tokens_details": {"text_tokens": prompt_tokens * n, "image_tokens": 0},
        }

    async def respond(self, body: Any, raw_request: Request):
        try:
            self.family.check_decoder()
        except ValueError as e:
            return error_response(str(e), "model")
        try:
            request = ImageRequest(body, self.family, self.served_names)
            prompt_ids = await asyncio.to_thread(self.family.prompt_ids, request.prompt, request.pixels)
        except BadRequest as e:
            return error_response(str(e), e.param)
        except ValueError as e:
            return error_response(str(e), "prompt")
        # Of another length than the prompt (or on a paired-layout server), it runs paired (guidance.pairing).
        try:
            negative_ids = await asyncio.to_thread(self.family.negative_prompt_ids, request.negative_prompt, request.pixels)
        except ValueError as e:
            return error_response(str(e), "negative_prompt")
        if negative_ids is not None:
            request.extra_args[NEGATIVE_PROMPT_KEY] = negative_ids
        # Every image gets a seed, reported with it: any image can be made again.
        first = secrets.randbelow(MAX_SEED) if request.seed is None else request.seed
        seeds = [first + i for i in range(request.n)]
        request_id = f"img-{uuid.uuid4().hex}"
        if request.stream:
            return await self.stream(request, prompt_ids, seeds[0], request_id)
        return await self.complete(request, prompt_ids, seeds, request_id, raw_request)

    async def complete(self, request, prompt_ids, seeds, request_id, raw_request) -> JSONResponse:
        async def one(i: int):
            final = None
            async for output in self.generate(request, prompt_ids, seeds[i], f"{request_id}-{i}"):
                final = output
            return await asyncio.to_thread(self.image_entry, final, seeds[i], request.pixels)

        work = asyncio.ensure_future(asyncio.gather(*(one(i) for i in range(request.n))))
        disconnect = asyncio.ensure_future(wait_for_disconnect(raw_request))
        try:
            await asyncio.wait({work, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnect.cancel()
        if not work.done():  # the client left: cancelling the generators aborts the requests
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            return error_response("client disconnected", status=499)
        try:
            results = work.result()
        except (ValueError, VLLMClientError) as e:  # the engine's checks of the options
            return error_response(str(e), engine_error_param(e, request))
        return JSONResponse({
            "created": int(time.time()), "data": [entry for entry, _ in results],
            "size": request.size, "output_format": "png",
            "usage": self.usage(len(prompt_ids), request.n, sum(tokens for _, tokens in results)),
        })

    async def stream(self, request, prompt_ids, seed, request_id):
        total = self.family.tokens_for(request.pixels)
        # Partial image k is sent once k/(N+1) of the tokens are committed.
        marks = [total * (k + 1) // (request.partial_images + 1) for k in range(request.partial_images)]
        outputs = self.generate(request, prompt_ids, seed, request_id)
        try:  # the first output: a bad option is still a plain 400, not an event
            first = await outputs.__anext__()
        except (ValueError, VLLMClientError) as e:
            await outputs.aclose()
            return error_response(str(e), engine_error_param(e, request))
        except StopAsyncIteration:
            first = None

        def event(kind: str, payload: dict) -> str:
            return f"event: {kind}\ndata: {json.dumps({'type': kind, 'created_at': int(time.time()), **payload})}\n\n"

        async def events():
            try:
                sent, output = 0, first
                while output is not None:
                    tokens = list(output.outputs[0].token_ids)
                    while sent < len(marks) and len(tokens) >= marks[sent]:
                        image = await asyncio.to_thread(self.family.to_partial_image, tokens, request.pixels)
                        yield event("image_generation.partial_image", {
                            "b64_json": png_b64(image), "partial_image_index": sent, "size": request.size,
                            "output_format": "png", "sjdpp": {"tokens": len(tokens)},
                        })
                        sent += 1
                    if output.finished:
                        entry, count = await asyncio.to_thread(self.image_entry, output, seed, request.pixels)
                        yield event("image_generation.completed", {
                            "b64_json": entry["b64_json"], "size": request.size, "output_format": "png",
                            "sjdpp": entry["sjdpp"], "usage": self.usage(len(prompt_ids), 1, count),
                        })
                        return
                    output = await outputs.__anext__()
            finally:
                await outputs.aclose()  # a disconnected client: aborts the request

        return StreamingResponse(events(), media_type="text/event-stream")


def engine_error_param(error: Exception, request: ImageRequest) -> str | None:
    """The body field an engine error is about, as this endpoint names it.

    The engine names per-request options `vllm_xargs` (the completions API's field), and some of
    its checks name no parameter; here they are top-level fields of the body.  So the field is
    the one the engine names if the body has it, else the sent field that the error's message
    names first (the message without the engine's "(parameter=..., value=...)" suffix, and
    without the list of known options an unknown one is answered with)."""
    param = _engine_error_field(error, request)
    if param == "prompt" and request.size_chosen and "one image" in str(error):
        return "size"  # the engine's "the prompt and one image do not fit", for a size the client chose
    return "negative_prompt" if param == NEGATIVE_PROMPT_KEY else param


def _engine_error_field(error: Exception, request: ImageRequest) -> str | None:
    param = getattr(error, "parameter", None)
    sent = [*request.sampling, *request.extra_args]
    if param in sent:
        return param
    message = str(error.args[0]) if error.args else str(error)
    message = message.split("; known:", 1)[0]
    named = {}
    for key in sent:
        found = re.search(rf"(?<!\w){re.escape(key)}(?!\w)", message)
        if found:
            named[key] = found.start()
    return min(named, key=named.get) if named else param


async def wait_for_disconnect(raw_request: Request) -> None:
    while True:
        message = await raw_request.receive()
        if message["type"] == "http.disconnect":
            return


async def seed_verdict(engine_client) -> bool | None:
    """The engine's seed probe verdict (`identical`), from its workers; None where it has none."""
    from ..config import SEED_PROBE_METHOD

    try:
        verdicts = await engine_client.collective_rpc(SEED_PROBE_METHOD, args=("verdict",))
    except Exception:  # an engine without the plugin's workers: nothing is known
        return None
    verdict = verdicts[0] if verdicts else None
    return None if verdict is None else verdict["identical"]


class ImagesEndpoint:
    """The `vllm.endpoint_plugins` entry point (a zero-argument factory)."""

    name = NAME
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        @app.post(ROUTE)
        async def create_image(raw_request: Request):
            service: ImageService | str | None = getattr(raw_request.app.state, "sjdpp_images", None)
            if service is None:
                return error_response("this server has no engine to make images", status=503)
            if isinstance(service, str):  # the served folder is one no image family reads
                return error_response(f"this server cannot make images: {service}", "model")
            try:
                body = await raw_request.json()
            except ValueError:
                return error_response("the body is not JSON")
            return await service.respond(body, raw_request)

    async def init_state(self, engine_client, state, args) -> None:
        from .. import families

        if engine_client is None:
            return
        model_config = engine_client.model_config
        names = list(args.served_model_name or []) or [args.model]
        load_config = getattr(getattr(engine_client, "vllm_config", None), "load_config", None)
        try:
            family = families.load(model_config.model, model_config.revision, getattr(load_config, "download_dir", None))
        except (OSError, ValueError) as e:  # the completions endpoint still serves the model
            logger.warning("%s: POST %s answers 400: %s", NAME, ROUTE, e)
            state.sjdpp_images = str(e)
            return
        defaults = {k: v for k, v in model_config.get_diff_sampling_param().items() if k in SAMPLING_KEYS}
        state.sjdpp_images = ImageService(engine_client, family, names, defaults, await seed_verdict(engine_client))


class MissingImagesEndpoint:
    """Stands in for `ImagesEndpoint` where `VLLM_PLUGINS` keeps vLLM from loading it
    (patches.plugins): the route answers 404 in OpenAI's error shape naming the fix, and an image
    model's server says so at start-up, instead of a bare "Not Found"."""

    name = f"{NAME}_missing"
    required_tasks = None

    def __init__(self, advice: str):
        self.advice = advice

    def attach_router(self, app: FastAPI) -> None:
        @app.post(ROUTE)
        async def images_endpoint_not_loaded(raw_request: Request):
            return error_response(f"POST {ROUTE} is not served: {self.advice}", status=404)

    async def init_state(self, engine_client, state, args) -> None:
        from ..families import ImageFamily, family_of

        if engine_client is not None and family_of(engine_client.model_config.hf_config) is not ImageFamily:
            logger.warning("POST %s is not served: %s", ROUTE, self.advice)
