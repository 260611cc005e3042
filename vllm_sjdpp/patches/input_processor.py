"""Patch of vllm/v1/engine/input_processor.py: every request is checked where vLLM turns a prompt
and its SamplingParams into an `EngineCoreRequest` (`InputProcessor.process_inputs`, in the API
server or the offline engine); a `VLLMValidationError` there is answered with HTTP 400.

Checked: prompt token ids inside the vocabulary (vLLM 0.32 does not check without a tokenizer,
and the embedding lookup would kill the engine), no structured outputs where guidance or SJD++
runs (nothing there holds tokens to a grammar), an image model's prompt and image inside the
context, guidance options against the prompt, no sampling option that addresses an image
model's logits by text id, and a request's SJD++ options (`sjdpp_*` in extra_args) against the
server's and the model's limits.  The facts come from the engine's own config (`self.vllm_config`),
read once per InputProcessor.
"""

from __future__ import annotations

import functools

import hashlib
from dataclasses import dataclass
from typing import Any

from ..config import REQUEST_PREFIX, SJDPPConfig
from .arg_utils import is_sjdpp, model_limits


@dataclass(frozen=True)
class ModelFacts:
    """What a request is checked against, read once from the engine's config."""

    guidance: Any  # `guidance.cfg.ServedGuidance`; None: not served with guidance
    image_codes: int | None  # logits per position of an image model, None: the vocabulary
    image_tokens: Any  # prompt -> generated tokens of its image (None: the model makes no images)
    vocab_size: int
    max_model_len: int
    sjdpp: SJDPPConfig | None  # the server's SJD++ options; None: not an SJD++ engine
    limits: tuple[int, int, int | None]
    pairs: bool  # the scheduler pairs requests (`guidance.pairing`)
    max_num_seqs: int
    cache: Any  # vLLM's CacheConfig: its num_gpu_blocks is known once the engine runs
    lookahead: int  # KV slots a sequence reserves past its tokens (speculative tokens)
    engines: int  # data-parallel engines sharing cache.num_gpu_blocks

    @classmethod
    def of(cls, vllm_config: Any) -> "ModelFacts":
        from ..families import family_of
        from ..guidance.cfg import ServedGuidance
        from .scheduler import pairs_supported

        model_config = vllm_config.model_config
        hf_config = model_config.hf_config
        family = family_of(hf_config)
        return cls(
            guidance=ServedGuidance.of(model_config),
            image_codes=family.image_vocab_size(hf_config),
            image_tokens=functools.partial(family.request_image_tokens, hf_config),
            vocab_size=model_config.get_vocab_size(),
            max_model_len=model_config.max_model_len,
            sjdpp=SJDPPConfig.of_server(vllm_config) if is_sjdpp(vllm_config.speculative_config) else None,
            limits=model_limits(model_config),
            pairs=pairs_supported(vllm_config),
            max_num_seqs=vllm_config.scheduler_config.max_num_seqs,
            cache=vllm_config.cache_config,
            lookahead=getattr(vllm_config.speculative_config, "num_speculative_tokens", None) or 0,
            engines=vllm_config.parallel_config.data_parallel_size,
        )


def check_request(facts: ModelFacts, prompt: list[int] | None, params: Any) -> list[int] | None:
    """Raise VLLMValidationError naming what is wrong with a request; return its unconditional
    prompt when it runs paired (`ServedGuidance.companion_prompt`), else None."""
    from vllm.exceptions import VLLMValidationError

    from ..families.base import check_sampling_for_image_codes
    from ..guidance.cfg import request_guidance

    from ..config import COMPANION_OF_KEY

    if COMPANION_OF_KEY in (params.extra_args or {}):
        # Only the scheduler writes it (on the companions it makes): a request carrying it would
        # be taken for a companion whose request never comes, and never end.
        raise VLLMValidationError(f"{COMPANION_OF_KEY!r} is the engine's own key, not a request option",
                                  parameter="vllm_xargs")
    if prompt is None and facts.guidance is not None:
        raise VLLMValidationError("a model served with guidance takes token-id or text prompts, not embeddings")
    if prompt is not None and any(not 0 <= t < facts.vocab_size for t in prompt):
        raise VLLMValidationError(f"prompt token ids must be in [0, {facts.vocab_size})", parameter="prompt")
    try:
        image_tokens = facts.image_tokens(prompt) if prompt is not None else None
    except ValueError as e:
        raise VLLMValidationError(str(e), parameter="prompt") from None
    if image_tokens is not None and len(prompt) + image_tokens > facts.max_model_len:
        # vLLM would cut max_tokens to what fits: a partial image.
        raise VLLMValidationError(
            f"this model's maximum context length is {facts.max_model_len} tokens: the prompt "
            f"({len(prompt)} tokens) and one image ({image_tokens} tokens) do not fit", parameter="prompt",
        )
    try:
        if facts.sjdpp is not None:
            config = facts.sjdpp.for_request(params.extra_args)
            if config is not None:
                config.check_model(*facts.limits, option_prefix=REQUEST_PREFIX)
        if facts.guidance is None:
            request_guidance(params.extra_args, prompt or [], None, 1.0, facts.vocab_size)  # refuses its options
            paired = None
        else:
            paired = facts.guidance.companion_prompt(params.extra_args, prompt or [])
        if paired is not None:
            check_paired(facts, prompt, paired, params, image_tokens)
    except ValueError as e:
        raise VLLMValidationError(str(e), parameter="vllm_xargs", value=params.extra_args) from None
    if facts.image_codes is not None:
        try:
            check_sampling_for_image_codes(params, facts.image_codes)
        except ValueError as e:
            raise VLLMValidationError(str(e)) from None
    return paired


def check_structured_outputs(facts: ModelFacts, params: Any) -> None:
    """Refuse structured outputs where guidance or SJD++ runs (VLLMValidationError naming the
    field): neither the guided logits nor the SJD++ step are held to a grammar, so a token that
    breaks it would end the request with an error, and a paired request would never end.
    Checked before vLLM's own checks of the field, which would name something else."""
    from vllm.exceptions import VLLMValidationError

    if getattr(params, "structured_outputs", None) is not None and (facts.guidance is not None or facts.sjdpp is not None):
        raise VLLMValidationError(
            "structured outputs (json, regex, choice, grammar, response_format) are not available on a server "
            "running classifier-free guidance or --speculative-config sjdpp", parameter="structured_outputs",
        )


def check_paired(facts: ModelFacts, prompt: list[int], negative: list[int], params: Any, image_tokens: int | None) -> None:
    """A paired request's negative prompt runs as a second sequence (`guidance.pairing`), which
    must fit the context as the prompt does.  Raises ValueError naming the option."""
    from ..guidance.cfg import NEGATIVE_PROMPT_KEY

    def refuse(why: str) -> ValueError:
        return ValueError(f"guidance option {NEGATIVE_PROMPT_KEY!r} of {len(negative)} tokens (the prompt has "
                          f"{len(prompt)}): {why}")

    if not facts.pairs:
        raise refuse("it runs as a second sequence, which needs the paired scheduler, which this server "
                     "does not run (it schedules asynchronously or has its own scheduler); start it with "
                     "--no-async-scheduling and without --scheduler-cls")
    if facts.max_num_seqs < 2:
        raise refuse("it runs as a second sequence: --max-num-seqs must be at least 2")
    if params.prompt_logprobs is not None:
        raise refuse("prompt_logprobs are not available on a paired request (its prompt's logits are combined "
                     "with no row of the other sequence's prompt)")
    generated = params.max_tokens if params.max_tokens is not None else facts.max_model_len - len(prompt)
    if image_tokens is not None:
        generated = max(generated, image_tokens)
    if len(negative) + generated > facts.max_model_len:
        raise refuse(f"it and the {generated} generated tokens exceed the maximum context length, "
                     f"{facts.max_model_len} (lower max_tokens or shorten it)")
    # Both sequences must fit the KV cache at once, or the pair could never run.
    blocks, size = (facts.cache.num_gpu_blocks or 0) // max(facts.engines, 1), facts.cache.block_size
    needed = sum(-(-(n + generated + facts.lookahead) // size) for n in (len(prompt), len(negative)))
    if blocks and needed > blocks:
        raise refuse(f"the prompt's and its sequences need {needed} KV blocks together at full length; the KV "
                     f"cache holds {blocks}")


def apply() -> None:
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    from ..guidance.cfg import NEGATIVE_PROMPT_KEY
    from vllm.exceptions import VLLMValidationError

    process_inputs = InputProcessor.process_inputs

    @functools.wraps(process_inputs)
    def process_inputs_checking_requests(self, *args, **kwargs):
        facts = getattr(self, "_sjdpp_model_facts", None)
        if facts is None:
            facts = self._sjdpp_model_facts = ModelFacts.of(self.vllm_config)
        check_structured_outputs(facts, args[2] if len(args) > 2 else kwargs.get("params"))
        request = process_inputs(self, *args, **kwargs)
        params = request.sampling_params
        if not isinstance(params, SamplingParams):
            return request
        paired = check_request(facts, request.prompt_token_ids, params)
        if paired is not None and getattr(request, "resumable", False):
            raise VLLMValidationError(
                "a paired request's negative prompt runs as a second sequence, which streamed input would not extend",
                parameter="vllm_xargs",
            )
        guidance = facts.guidance
        extra_args = params.extra_args or {}
        if guidance is not None and not guidance.one_branch and (paired is not None or NEGATIVE_PROMPT_KEY in extra_args):
            # Both branches in a sequence: the uncond branch's KV depends on the negative prompt,
            # so blocks must not be shared with other negative prompts (vLLM hashes the salt into
            # the first block; the rule's own prompt is a per-token function of the prompt and
            # needs none).  A paired request's sequences (its own and its companion's) repeat their
            # prompt in that branch: one salt for all of them, so that prompts and negative prompts
            # are cached across requests.  With one branch per sequence, KV is the tokens' alone.
            key = "paired" if paired is not None else list(extra_args[NEGATIVE_PROMPT_KEY])
            request.cache_salt = hashlib.sha256(repr((request.cache_salt, key)).encode()).hexdigest()
        return request

    InputProcessor.process_inputs = process_inputs_checking_requests
