"""Classifier-free guidance inside vLLM: two branches, in one sequence or one each.

In the "stacked" layout a guided model runs each sequence as two branches: the conditional one
on the sequence's own tokens, the unconditional one on the same tokens with the prompt replaced
by the unconditional prompt (the same length and positions; generated tokens and SJD++ drafts are shared).  Both
branches keep their keys and values in the sequence's own paged blocks as twice the KV heads
(cond heads, then uncond heads), so vLLM's scheduler, block tables, chunked prefill, preemption
and prefix caching see one ordinary sequence.  The logits are combined before any sampler sees
them, as transformers' `generate` does before temperature, top-k and top-p:

    l = l_u + s * (l_c - l_u)

Per request (`SamplingParams.extra_args`, OpenAI `vllm_xargs`): `guidance_scale` s >= 0 (1: the
conditional model alone, 0: the unconditional one; default from generation_config.json) and
`negative_prompt_token_ids` (default: the model's unconditional rule applied to the prompt).
An unconditional prompt of the prompt's length runs in the prompt's sequence, as above; one of
another length runs as a sequence of its own, paired with the request's (`pairing`), and the
rows P samples combine with its partner's rows instead.

That is the "stacked" layout.  Where the family's unconditional prompt has another length than
the prompt (Emu3's, Lumina-mGPT's: every request pairs), a server runs the "paired" layout
instead: one branch per sequence.  The engine sees the checkpoint's own heads, each sequence
runs its own tokens once, and every guided request (scale != 1) runs as a pair, whatever the
length of its negative prompt: 2 rows per position and 2 sequences of KV per image, what
guidance costs.  config.json's (or --hf-overrides') `sjdpp_guidance_layout` chooses either.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..families import family_of, stream_grid
from ..kernels.host import PinnedStaging
from ..families.rule import UnconditionalRule
from .pairing import COMPANION_SUFFIX, companion_of, needs_companion, stream_window

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
# The layout chosen (config.json or --hf-overrides, top level), and where the hook writes it (the
# text config, which travels to the workers with the heads).
LAYOUT_KEY = "sjdpp_guidance_layout"
LAYOUT_ATTR = "guidance_layout"
STACKED, PAIRED = "stacked", "paired"


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


def chosen_layout(model_config: Any) -> str:
    """The layout a guided folder runs in: `LAYOUT_KEY` where the config gives it, else "paired"
    where the family's unconditional prompt has another length than the prompt (every request
    pairs), else "stacked".  Raises ValueError naming the key."""
    given = getattr(model_config.hf_config, LAYOUT_KEY, None)
    if given is None:
        return PAIRED if unconditional_rule(model_config).pairs else STACKED
    if given not in (STACKED, PAIRED):
        raise ValueError(f"config {LAYOUT_KEY!r}: got {given!r}; allowed: {STACKED!r} (both branches in a "
                         f"sequence) or {PAIRED!r} (one branch per sequence)")
    return given


def default_scale(model_config: Any) -> float:
    """generation_config.json's `guidance_scale` (transformers' name), else the family's (1: no
    guidance)."""
    value = model_config.try_get_generation_config().get(SCALE_KEY)
    return family_of(model_config.hf_config).default_guidance_scale() if value is None else float(value)


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
    if not negative:
        raise _invalid(NEGATIVE_PROMPT_KEY, negative, "at least one token id")
    return float(scale), list(negative)


@dataclass(frozen=True)
class ServedGuidance:
    """How a server guides its requests: the folder's rule and default scale, the vocabulary the
    options are checked against, and whether each sequence runs one branch (`PAIRED`)."""

    rule: UnconditionalRule
    scale_default: float
    vocab_size: int
    one_branch: bool = False

    @classmethod
    def of(cls, model_config: Any) -> ServedGuidance | None:
        """None for a model vLLM does not serve with guidance."""
        rule = served_rule(model_config)
        if rule is None:
            return None
        one_branch = getattr(model_config.hf_text_config, LAYOUT_ATTR, STACKED) == PAIRED
        return cls(rule, default_scale(model_config), model_config.get_vocab_size(), one_branch)

    def resolve(self, extra_args: dict | None, prompt: list[int]) -> tuple[float, list[int]]:
        """(scale, unconditional prompt) of a request (`request_guidance`; ValueError naming the
        option)."""
        return request_guidance(extra_args, prompt, self.rule, self.scale_default, self.vocab_size)

    def companion_prompt(self, extra_args: dict | None, prompt: list[int]) -> list[int] | None:
        """The prompt of the sequence that pairs with a request's (`pairing`); None: it runs alone.
        The one decision the input checks, the scheduler and the model runner all read."""
        scale, negative = self.resolve(extra_args, prompt)
        return negative if needs_companion(prompt, negative, scale, self.one_branch) else None


@dataclass(frozen=True)
class RequestGuidance:
    """How a request in the batch is guided: its scale, the prompt its own sequence's second
    branch runs (in the paired layout: its own prompt, which marks the prompt's tokens), and the
    request whose rows pair with its rows (`pairing`; None: not paired).  A paired sequence's
    second branch repeats its own prompt (and goes unused); a companion's rows serve as its
    request's unconditional rows, and are combined at scale 1 (stacked) or left as they are
    (paired); its samples are replaced by its request's (`mirror_samples`)."""

    scale: float
    override: np.ndarray
    partner: str | None = None
    companion: bool = False
    grid: Any = None  # the grid of its image (`kernels.grid.StreamGrid`), where the model has one


class GuidanceBatch:
    """Per-token guidance inputs of the batch the model runs next, filled by the model runner
    before each forward (`prepare`) and read inside the guided model's compiled forward and by
    its compute_logits.

    uncond_override[t]: the unconditional branch's token at t, or -1 for the cond token (drafts
    and generated tokens are shared; on the async path vLLM fills those on the device); in the
    paired layout the sequence's own prompt token (it only marks the prompt's tokens).
    token_scale[t]: the guidance scale of t's request.
    token_class[t]: where the model's stream has a grid (`kernels.grid.StreamGrid`), the slot
    class of the position row t predicts (the one after t), whose row of `forbidden` says which
    ids its logits may not give; applied after guidance, as transformers'
    `prefix_allowed_tokens_fn`.
    partner_token[t]: for a row a paired request samples, the token of its companion at the
    same place of the stream, whose logits are its unconditional ones (-1: none).

    All are allocated once, for the runner's largest batch (--max-num-batched-tokens), and only
    written in place: uncond_override is an input of the compiled forward (a buffer of its
    module), and a CUDA graph replays the addresses it was captured with (the others are read
    by compute_logits).
    """

    def __init__(self, served: ServedGuidance, size: int, device, grid=None, request_grid=None):
        if size > MAX_BATCH_TOKENS:
            raise ValueError(f"--max-num-batched-tokens {size}: guided models take at most {MAX_BATCH_TOKENS}")
        self.served = served
        self.branches = 1 if served.one_branch else 2  # branches each sequence runs
        self.requests: dict[str, RequestGuidance] = {}
        self.uncond_override = torch.full((size,), -1, dtype=torch.long, device=device)
        self.token_scale = torch.full((size,), served.scale_default, dtype=torch.float32, device=device)
        self.partner_token = torch.full((size,), -1, dtype=torch.long, device=device)
        self.has_partners = False
        self.staging = PinnedStaging()  # the host side of the writes above, each step
        self.mirrors: list[tuple[int, int]] = []  # (request row, companion row) in the batch
        self.grid = grid
        self.request_grid = request_grid  # prompt -> its image's grid (a family's `request_grid`)
        if grid is not None:
            self.token_class = torch.zeros(size, dtype=torch.long, device=device)
            self.forbidden = torch.from_numpy(grid.forbidden_masks(served.vocab_size)).to(device)

    @classmethod
    def for_model(cls, vllm_config: Any, device) -> GuidanceBatch:
        """The inputs of a guided model that vLLM builds with `vllm_config` (ValueError naming
        what the folder lacks, or a batch past MAX_BATCH_TOKENS)."""
        model_config = vllm_config.model_config
        hf_config = model_config.hf_config
        return cls(
            ServedGuidance.of(model_config),
            vllm_config.scheduler_config.max_num_batched_tokens,
            device,
            stream_grid(model_config),
            functools.partial(family_of(hf_config).request_grid, hf_config),
        )

    def forget(self, req_id: str) -> None:
        """vLLM removed the request (called from the runner's one hook for that)."""
        self.requests.pop(req_id, None)

    def request(self, req_id: str, prompt: list[int], extra_args: dict | None) -> RequestGuidance:
        state = self.requests.get(req_id)
        if state is None:
            guided = companion_of(extra_args)
            own = np.asarray(prompt, dtype=np.int64)  # a paired sequence's second branch repeats it
            if guided is not None:  # its rows are not sampled: any grid
                state = RequestGuidance(1.0, own, partner=guided, companion=True, grid=self.grid)
            else:
                # Checked when the request arrived (patches.input_processor); a failure here is a bug.
                scale, negative = self.served.resolve(extra_args, prompt)
                grid = None if self.grid is None else self.request_grid(prompt, self.grid)
                paired = needs_companion(prompt, negative, scale, self.served.one_branch)
                # One branch per sequence: the override only marks the prompt's tokens (Janus embeds by it).
                override = own if paired or self.served.one_branch else np.asarray(negative, dtype=np.int64)
                state = RequestGuidance(scale, override, partner=req_id + COMPANION_SUFFIX if paired else None, grid=grid)
            self.requests[req_id] = state
        return state

    def prepare(self, runner, num_tokens_padded: int) -> None:
        """Fill the inputs of the runner's next forward, of `num_tokens_padded` tokens
        (ValueError, before the forward, past the buffers), and mark for discarding the paired
        requests that run without their partner this step."""
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
        scale = np.full(num_tokens_padded, self.served.scale_default, dtype=np.float32)
        scale[:total] = np.repeat(np.array([s.scale for s in states], dtype=np.float32), counts)
        override = np.full(num_tokens_padded, -1, dtype=np.int64)
        computed = batch.num_computed_tokens_cpu[:num_reqs]
        for i, state in enumerate(states):
            negative = state.override
            if computed[i] < len(negative):  # prompt tokens in this step
                first = int(computed[i])
                n = min(int(counts[i]), len(negative) - first)
                override[starts[i] : starts[i] + n] = negative[first : first + n]
        self.staging.write(self.uncond_override, override)
        self.staging.write(self.token_scale, scale)
        self._pair(runner, states, starts, computed)
        if self.grid is not None:
            # Token t sits at position computed + its offset in the request (vLLM's positions) and
            # its row predicts the next position: stream index that minus the prompt's length.
            offset = np.arange(total) - np.repeat(starts[:-1], counts)
            index = np.full(num_tokens_padded, -1, dtype=np.int64)
            index[:total] = np.repeat(computed - batch.num_prompt_tokens[:num_reqs], counts) + offset + 1
            rows, per_row = (
                np.concatenate([np.repeat([getattr(s.grid, f) for s in states], counts), np.ones(num_tokens_padded - total, np.int64)])
                for f in ("rows", "codes_per_row")
            )
            self.staging.write(self.token_class, self.grid.slot_classes(index, rows, per_row))

    def _pair(self, runner, states: list[RequestGuidance], starts: np.ndarray, computed: np.ndarray) -> None:
        """Pair the rows of the batch's paired requests (`partner_token`, `mirrors`), and discard
        the members whose partner does not sample with them this step."""
        self.mirrors = []
        if not any(s.partner for s in states):
            self.has_partners = False
            return
        batch = runner.input_batch
        num_reqs = len(states)
        discard = runner.discard_request_mask.np[:num_reqs]
        windows = [
            stream_window(int(computed[i]), int(starts[i + 1] - starts[i]), int(batch.num_tokens_no_spec[i]))
            for i in range(num_reqs)
        ]
        partner = np.full(self.partner_token.numel(), -1, dtype=np.int64)
        alone = []
        for i, state in enumerate(states):
            if state.partner is None or state.companion or discard[i]:
                continue
            j = batch.req_id_to_index.get(state.partner)
            if j is None or discard[j] or windows[i] != windows[j]:
                alone.append(i)
                continue
            w = windows[i]
            partner[starts[i + 1] - w : starts[i + 1]] = np.arange(starts[j + 1] - w, starts[j + 1])
            self.mirrors.append((i, j))
        joint = {companion for _, companion in self.mirrors}
        for j, state in enumerate(states):  # companions whose request does not sample with them
            if state.companion and not discard[j] and j not in joint:
                alone.append(j)
        if alone:
            self._discard(runner, alone)
        self.staging.write(self.partner_token, partner)
        self.has_partners = bool(self.mirrors)

    @staticmethod
    def _discard(runner, rows: list[int]) -> None:
        """The runner drops these requests' sampled tokens, as it drops a partial prefill's."""
        runner.discard_request_mask.np[rows] = True
        runner.discard_request_mask.copy_to_gpu(runner.input_batch.num_reqs)

    def partner_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Of R logits rows (`rows`: their token indices in the batch): [P] the rows a paired
        request samples whose companion's row at the same place of the stream is among them, and
        [P] the index of that row.  (A device sync where pairs are in the batch: the paired
        scheduler that makes them runs synchronously anyway.)"""
        partner = self.partner_token[rows]
        row_of_token = torch.full_like(self.partner_token, -1)
        row_of_token[rows] = torch.arange(rows.numel(), device=rows.device)
        partner_row = row_of_token[partner.clamp(min=0)]
        paired = ((partner >= 0) & (partner_row >= 0)).nonzero()[:, 0]
        return paired, partner_row[paired]

    def unconditional_rows(self, rows: torch.Tensor, cond_logits: torch.Tensor, uncond_logits: torch.Tensor):
        """Stacked layout: [R, V] unconditional logits of R rows (`rows`: their token indices in
        the batch), written in `uncond_logits`: a paired request's rows take its companion's
        (conditional) logits at the same place of the stream."""
        if self.has_partners:
            paired, partner = self.partner_rows(rows)
            uncond_logits[paired] = cond_logits[partner]
        return uncond_logits

    def guide_pairs(self, logits: torch.Tensor, index_columns: torch.Tensor) -> torch.Tensor:
        """Paired layout: [R, V] logits (each sequence's own) -> float32 guided logits: each row a
        paired request samples combined with its companion's row (`combine`); every other row
        (a companion's, a prompt's, scale 1) as it is, what combining it with itself gives."""
        guided = logits.float()
        if self.has_partners:
            rows = self.rows(index_columns)
            paired, partner = self.partner_rows(rows)
            cond = guided[paired]
            guided[paired] = combine(cond, guided[partner], self.token_scale[rows[paired]], out=cond)
        return guided

    def mirror_samples(self, sampled_token_ids: torch.Tensor) -> None:
        """[requests, rows] sampled tokens: each companion takes its request's (in place)."""
        if self.mirrors:
            to_request, to_companion = zip(*self.mirrors)
            sampled_token_ids[list(to_companion)] = sampled_token_ids[list(to_request)]

    @staticmethod
    def unconditional_ids(uncond_override: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] token ids -> [T], the unconditional branch's ids (within a compiled forward, which
        holds `uncond_override` as a buffer: `guidance.llama.BranchForward`)."""
        torch._check(input_ids.shape[0] <= uncond_override.shape[0])  # for unbacked batch sizes
        override = uncond_override[: input_ids.shape[0]]
        return torch.where(override >= 0, override.to(input_ids.dtype), input_ids)

    @staticmethod
    def index_columns(num_tokens: int, dtype: torch.dtype, device) -> torch.Tensor:
        """[num_tokens, 2]: each token's index as (high, low) base-256 digits."""
        t = torch.arange(num_tokens, device=device)
        return torch.stack([t // INDEX_BASE, t % INDEX_BASE], dim=-1).to(dtype)

    @staticmethod
    def prompt_mask(uncond_override: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Which of the batch's tokens are prompt tokens (the others are generated tokens and
        drafts): exactly those the unconditional branch may override."""
        torch._check(num_tokens <= uncond_override.shape[0])
        return uncond_override[:num_tokens] >= 0

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


def combine(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, scale: torch.Tensor, out=None) -> torch.Tensor:
    """l_u + s (l_c - l_u), per row, in float32 (as transformers' processors work), in one new
    [R, V] tensor (at Emu3's vocabulary a row is 0.7 MB), or in `out` (float32, of that shape;
    `cond_logits` itself allowed)."""
    lu = uncond_logits.float()
    return torch.sub(cond_logits.float(), lu, out=out).mul_(scale[:, None]).add_(lu)
