"""Classifier-free guidance inside vLLM: one sequence, two branches, one pass.

A guided model runs each sequence as two branches: the conditional one on the sequence's own
tokens, the unconditional one on the same tokens with the prompt replaced by the unconditional
prompt (the same length and positions; generated tokens and SJD++ drafts are shared).  Both
branches keep their keys and values in the sequence's own paged blocks as twice the KV heads
(cond heads, then uncond heads), so vLLM's scheduler, block tables, chunked prefill, preemption
and prefix caching see one ordinary sequence.  The logits are combined before any sampler sees
them, as transformers' `generate` does before temperature, top-k and top-p:

    l = l_u + s * (l_c - l_u)

Per request (`SamplingParams.extra_args`, OpenAI `vllm_xargs`): `guidance_scale` s >= 0 (1: the
conditional model alone, 0: the unconditional one; default from generation_config.json) and
`negative_prompt_token_ids` (default: the model's unconditional rule applied to the prompt).
The unconditional prompt must have the prompt's length: one of another length (Emu3, Lumina-mGPT)
needs a sequence of its own (paired requests: benchmarks/README.md, "What guidance costs").
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..families import family_of, stream_grid
from ..families.rule import UnconditionalRule

SCALE_KEY = "guidance_scale"
NEGATIVE_PROMPT_KEY = "negative_prompt_token_ids"
REQUEST_KEYS = (SCALE_KEY, NEGATIVE_PROMPT_KEY)
# Rows handed to compute_logits carry their token's index in the batch as two base-256 digits:
# exact in bf16 and fp16, whatever rows vLLM gathers (sampling, prompt logprobs, warm-up).
INDEX_BASE = 256
MAX_BATCH_TOKENS = INDEX_BASE**2


# Set on the text config by a guided architecture's config hook (the branches' own head counts):
# what marks a model that vLLM runs with guidance, whatever its config.json holds besides.
BRANCH_HEADS_ATTR = "guidance_branch_heads"


def unconditional_rule(model_config: Any) -> UnconditionalRule:
    """The model family's rule, from the folder's configs (ValueError naming what is missing)."""
    hf_config = model_config.hf_config
    return family_of(hf_config).unconditional_rule(hf_config, model_config.try_get_generation_config())


def served_rule(model_config: Any) -> UnconditionalRule | None:
    """The unconditional rule of a model vLLM serves with guidance; None for any other model
    (for instance a guided folder served as a plain Llama with hf_overrides)."""
    if getattr(model_config.hf_text_config, BRANCH_HEADS_ATTR, None) is None:
        return None
    return unconditional_rule(model_config)


def default_scale(model_config: Any) -> float:
    """generation_config.json's `guidance_scale` (transformers' name), else 1 (no guidance)."""
    value = model_config.try_get_generation_config().get(SCALE_KEY)
    return 1.0 if value is None else float(value)


def _invalid(key: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"guidance option {key!r}: got {value!r}; allowed: {allowed}")


def request_guidance(
    extra_args: dict | None,
    prompt: list[int],
    rule: UnconditionalRule | None,
    scale_default: float,
    vocab_size: int,
) -> tuple[float, list[int]] | None:
    """(scale, unconditional prompt) of a request, validated; None for an unguided model.

    Raises ValueError naming the option, which vLLM answers with HTTP 400.
    """
    args = extra_args or {}
    given = [k for k in REQUEST_KEYS if k in args]
    if rule is None:
        if given:
            raise _invalid(given[0], args[given[0]], "nothing: this model is not served with guidance")
        return None
    scale = args.get(SCALE_KEY, scale_default)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise _invalid(SCALE_KEY, scale, "a finite number >= 0 (1: no guidance)")
    if NEGATIVE_PROMPT_KEY not in args:  # absent: the model's rule; a null given is refused below
        return float(scale), rule.apply(prompt)
    negative = args[NEGATIVE_PROMPT_KEY]
    if (
        not isinstance(negative, (list, tuple))
        or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in negative)
    ):
        raise _invalid(NEGATIVE_PROMPT_KEY, negative, f"a list of token ids in [0, {vocab_size})")
    if len(negative) != len(prompt):
        raise _invalid(
            NEGATIVE_PROMPT_KEY,
            f"{len(negative)} tokens",
            f"exactly the prompt's length, {len(prompt)} (both branches share one sequence; "
            "a negative prompt of another length is not supported yet)",
        )
    return float(scale), list(negative)


class GuidanceBatch:
    """Per-token guidance inputs of the batch the model runs next, filled by the model runner
    before each forward (`prepare`) and read inside the guided model's compiled forward and by
    its compute_logits.

    uncond_override[t]: the unconditional branch's token at t, or -1 for the cond token (drafts
    and generated tokens are shared; on the async path vLLM fills those on the device).
    token_scale[t]: the guidance scale of t's request.
    token_class[t]: where the model's stream has a grid (`kernels.grid.StreamGrid`), the slot
    class of the position row t predicts (the one after t), whose row of `forbidden` says which
    ids its logits may not give; applied after guidance, as transformers'
    `prefix_allowed_tokens_fn`.

    All are allocated once, for the runner's largest batch (--max-num-batched-tokens), and only
    written in place: uncond_override is an input of the compiled forward, and a CUDA graph
    replays the addresses it was captured with (the others are read by compute_logits).
    """

    def __init__(
        self, rule: UnconditionalRule, scale_default: float, vocab_size: int, size: int, device, grid=None
    ):
        if size > MAX_BATCH_TOKENS:
            raise ValueError(f"--max-num-batched-tokens {size}: guided models take at most {MAX_BATCH_TOKENS}")
        self.rule = rule
        self.scale_default = scale_default
        self.vocab_size = vocab_size
        self.requests: dict[str, tuple[float, np.ndarray]] = {}
        self.uncond_override = torch.full((size,), -1, dtype=torch.long, device=device)
        self.token_scale = torch.full((size,), scale_default, dtype=torch.float32, device=device)
        self.grid = grid
        if grid is not None:
            self.token_class = torch.zeros(size, dtype=torch.long, device=device)
            self.forbidden = torch.from_numpy(grid.forbidden_masks(vocab_size)).to(device)

    @classmethod
    def for_model(cls, vllm_config: Any, device) -> GuidanceBatch:
        """The inputs of a guided model that vLLM builds with `vllm_config` (ValueError naming
        what the folder lacks, or a batch past MAX_BATCH_TOKENS)."""
        model_config = vllm_config.model_config
        return cls(
            served_rule(model_config),
            default_scale(model_config),
            model_config.get_vocab_size(),
            vllm_config.scheduler_config.max_num_batched_tokens,
            device,
            stream_grid(model_config),
        )

    def forget(self, req_id: str) -> None:
        """vLLM removed the request (called from the runner's one hook for that)."""
        self.requests.pop(req_id, None)

    def request(self, req_id: str, prompt: list[int], extra_args: dict | None) -> tuple[float, np.ndarray]:
        state = self.requests.get(req_id)
        if state is None:
            # Checked when the request arrived (patches.input_processor); a failure here is a bug.
            scale, negative = request_guidance(extra_args, prompt, self.rule, self.scale_default, self.vocab_size)
            state = self.requests[req_id] = (scale, np.asarray(negative, dtype=np.int64))
        return state

    def prepare(self, runner, num_tokens_padded: int) -> None:
        """Fill the inputs of the runner's next forward, of `num_tokens_padded` tokens
        (ValueError, before the forward, past the buffers)."""
        if num_tokens_padded > self.uncond_override.numel():
            raise ValueError(
                f"a batch of {num_tokens_padded} tokens exceeds the guidance inputs' "
                f"{self.uncond_override.numel()} (--max-num-batched-tokens)"
            )
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        live = batch.req_ids[:num_reqs]
        states = [
            self.request(r, runner.requests[r].prompt_token_ids, runner.requests[r].sampling_params.extra_args)
            for r in live
        ]
        starts = runner.query_start_loc.np[: num_reqs + 1]
        counts = np.diff(starts)
        total = int(starts[-1])
        scale = np.full(num_tokens_padded, self.scale_default, dtype=np.float32)
        scale[:total] = np.repeat(np.array([s for s, _ in states], dtype=np.float32), counts)
        override = np.full(num_tokens_padded, -1, dtype=np.int64)
        computed = batch.num_computed_tokens_cpu[:num_reqs]
        prompt_lens = np.array([len(negative) for _, negative in states])
        for i in np.nonzero(computed < prompt_lens)[0]:  # requests with prompt tokens in this step
            first, negative = int(computed[i]), states[i][1]
            n = min(int(counts[i]), len(negative) - first)
            override[starts[i] : starts[i] + n] = negative[first : first + n]
        self.uncond_override[:num_tokens_padded].copy_(torch.from_numpy(override), non_blocking=True)
        self.token_scale[:num_tokens_padded].copy_(torch.from_numpy(scale), non_blocking=True)
        if self.grid is not None:
            # Token t sits at position computed + its offset in the request (vLLM's positions) and
            # its row predicts the next position: stream index that minus the prompt's length.
            offset = np.arange(total) - np.repeat(starts[:-1], counts)
            index = np.full(num_tokens_padded, -1, dtype=np.int64)
            index[:total] = np.repeat(computed - batch.num_prompt_tokens[:num_reqs], counts) + offset + 1
            self.token_class[:num_tokens_padded].copy_(
                torch.from_numpy(self.grid.slot_classes(index)), non_blocking=True
            )

    def unconditional_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] token ids -> [T], the unconditional branch's ids (within a compiled forward)."""
        torch._check(input_ids.shape[0] <= self.uncond_override.shape[0])  # for unbacked batch sizes
        override = self.uncond_override[: input_ids.shape[0]]
        return torch.where(override >= 0, override.to(input_ids.dtype), input_ids)

    @staticmethod
    def index_columns(num_tokens: int, dtype: torch.dtype, device) -> torch.Tensor:
        """[num_tokens, 2]: each token's index as (high, low) base-256 digits."""
        t = torch.arange(num_tokens, device=device)
        return torch.stack([t // INDEX_BASE, t % INDEX_BASE], dim=-1).to(dtype)

    def prompt_mask(self, num_tokens: int) -> torch.Tensor:
        """Which of the batch's tokens are prompt tokens (the others are generated tokens and
        drafts): exactly those the unconditional branch may override."""
        torch._check(num_tokens <= self.uncond_override.shape[0])
        return self.uncond_override[:num_tokens] >= 0

    def rows(self, index_columns: torch.Tensor) -> torch.Tensor:
        """Each row's token index in the batch, from the index columns that rode along with it."""
        digits = index_columns.float().round().long()
        return (digits[:, 0] * INDEX_BASE + digits[:, 1]).clamp(0, self.token_scale.numel() - 1)

    def row_scales(self, index_columns: torch.Tensor) -> torch.Tensor:
        """The guidance scale of each row."""
        return self.token_scale[self.rows(index_columns)]

    def constrain(self, logits: torch.Tensor, index_columns: torch.Tensor) -> torch.Tensor:
        """[rows, V] logits with every token the grid forbids at the row's position at -inf
        (in place; unchanged without a grid)."""
        if self.grid is None:
            return logits
        return logits.masked_fill_(self.forbidden[self.token_class[self.rows(index_columns)]], float("-inf"))


def combine(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """l_u + s (l_c - l_u), per row, in float32 (as transformers' processors work)."""
    lu = uncond_logits.float()
    return lu + scale[:, None] * (cond_logits.float() - lu)
