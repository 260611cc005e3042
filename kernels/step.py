r"""The exact SJD++ step: verify a window of drafts, commit, and build the next window.

Layout (the one vLLM's `SpecDecodeMetadata` uses): request i has k_i drafts, flattened with
`cu_num_draft_tokens`; its k_i + 1 target rows sit at rows cu_{i-1} + i ... cu_i + i of
`target_probs` (row j is the distribution of draft j's position, row k_i the bonus position).
Call p_j the target row j and q_j the proposal draft d_j was drawn from.

Verification (speculative sampling).  With u_j ~ U[0, 1):
    accept d_j  iff  u_j * q_j(d_j) < p_j(d_j)        (probability min(1, p_j(d_j) / q_j(d_j)))
left to right; a = the number accepted.  Row a then yields one more committed token:
    a < k_i:  r ~ norm(max(0, p_a - q_a))    (the residual; with one-hot q: p_a without d_a)
    a = k_i:  r ~ p_{k_i}                    (the bonus token)
so x_a ~ p_a exactly: P(x = v) = min(p, q)(v) + (1 - sum min(p, q)) * residual(v) = p(v).
Greedy requests accept iff d_j = argmax p_j and commit argmax p_a.

Next window.  Rows j > a have been computed on the old drafts; row j proposes the token of slot
j - a - 1 of the next window (the first rows after the commit).  For a random request:
    reuse="none":        d' ~ p_j,                               q' = p_j
    reuse="coupled":     keep d' = d_j iff u_j * q_j(d_j) < p_j(d_j), else d' ~ residual(p_j, q_j);
                         q' = p_j  (same identity as above: d' ~ p_j exactly)
    reuse="confidence":  keep d' = d_j iff p_j(d_j) >= threshold with q' = one-hot(d_j),
                         else d' ~ p_j, q' = p_j  (a one-hot proposal verifies any draft exactly)
Row k_i has no old draft and always draws from p.  Greedy requests take d' = argmax p_j.
Slots past the redrafted ones are fresh tokens with one-hot q (see `fresh.py`).
Gumbel-coupled verification (`StepBatch.gumbel`; MC-SJD's and SCD's Gumbel coupling).  The
request's noise row j is E_{t+j}, keyed by its absolute position t + j (`noise.py`), and every
row's token is its race winner  w_j = argmax_v p_j(v) / E_{t+j}(v):
    accept d_j  iff  d_j = w_j,  left to right;  commit w_a (a < k_i: first rejection; a = k_i: bonus)
    next window: row j > a proposes w_j; a draft that stays the winner is kept, so SJD++'s reuse
    comes for free; no proposal q is stored or read.
Exact for any drafts.  Rows up to the first rejection see accepted drafts only, that is the
committed prefix, so by induction the token committed at position m is w(p_m(x_<m), E_m): the
same function of the noise tape as plain decoding that races p_m against E_m, hence plain
decoding's token for that key, whatever the windows, the batch or the chunking.  In law it is
p_m, since E_m is used at position m only and x_<m is a function of E_<m.
Greedy requests are the same rule with w_j = argmax p_j.

u_j serves the verification of rows j <= a and the coupling test of rows j > a: never both, so
each row needs one uniform and the two uses stay independent.

Every draw is an exponential race: argmax_v w(v) / E_v with E_v ~ Exp(1) is distributed as
norm(w), and needs one pass over the row.  Where a residual is empty (p = q up to rounding) the
race falls back to p.

The per-row decisions above are scalar work on O(rows) elements and are computed here, once, in
NumPy on the host for every backend (`host.py` says why); the heavy part, a pass over whole
vocabulary rows (residual, race, q write), is the row pass with implementations that must agree
exactly: `row_pass_torch` (CPU: eager PyTorch for small steps, the same code fused by
TorchInductor for large ones) and `row_pass_triton` (CUDA: one fused kernel, each probability
row read once and each q row written once). `backend=` or the environment variable
SJDPP_STEP_BACKEND picks one: torch | inductor | triton.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .fresh import FreshTokens, fill_fresh_tokens
from .host import INDUCTOR_MIN_ELEMENTS, to_device, to_host
from .noise import SALT_FRESH, keyed_exponentials, keyed_uniforms, request_key, row_keys

REUSE_NONE, REUSE_COUPLED, REUSE_CONFIDENCE = 0, 1, 2
REUSE_CODES = {"none": REUSE_NONE, "coupled": REUSE_COUPLED, "confidence": REUSE_CONFIDENCE}
PLACEHOLDER_TOKEN_ID = -1


Array = torch.Tensor | np.ndarray


@dataclass
class StepBatch:
    """What the target model produced for the current windows, and per-request settings.  The
    rows over the vocabulary are device tensors; the rest is read on the host, where the plan
    runs, and may be tensors or NumPy arrays."""

    cu_num_draft_tokens: Array  # [B] int, cumulative draft counts
    target_probs: torch.Tensor  # [T + B, V] after temperature / top-k / top-p
    draft_token_ids: Array  # [T] int
    draft_probs: torch.Tensor | None  # [T, V] proposals; rows of one-hot drafts are not read
    draft_is_onehot: Array  # [T] bool: q_j = one-hot(d_j) (fresh or confidently kept)
    greedy: Array  # [B] bool
    reuse: Array  # [B] int, REUSE_* codes
    threshold: Array  # [B] float32, used by REUSE_CONFIDENCE
    next_window_len: Array  # [B] int, drafts wanted for the next pass (0 allowed)
    # [T] int: the row of draft_probs holding draft t's q (default: row t), so that proposals
    # can stay in the buffer an earlier step wrote them to.
    draft_prob_rows: Array | None = None
    # [B] bool: verified by Gumbel coupling (default: none); its noise rows must be keyed by
    # position (`StepNoise.sample_per_request(keys=...)`) for the output to be plain decoding's.
    gumbel: Array | None = None


@dataclass
class StepNoise:
    """The step's randomness, supplied by the caller so that backends and seeds are comparable."""

    uniforms: torch.Tensor  # [T + B] float32 in [0, 1): one per target row
    exponentials: torch.Tensor  # [T + B, V] float32 Exp(1), > 0: one race per target row
    fresh_uniforms: torch.Tensor  # [T'] float32 in [0, 1): one per next-window slot

    @classmethod
    def sample(
        cls,
        num_rows: int,
        vocab_size: int,
        next_num_drafts: int,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> "StepNoise":
        generators = {} if generator is None else {0: generator}
        return cls.sample_per_request([num_rows], [next_num_drafts], vocab_size, generators, device)

    @classmethod
    def sample_per_request(
        cls,
        rows_per_request: list[int],
        slots_per_request: list[int],
        vocab_size: int,
        generators: dict[int, torch.Generator],
        device: torch.device | str = "cpu",
        keys: dict[int, tuple[int, int]] | None = None,
    ) -> "StepNoise":
        """Per request i, in order of precedence:
        - keys[i] = (key, position of its first row): position-keyed noise (`noise.py`), row j
          raced with E(key, position + j, .); what Gumbel-coupled verification needs;
        - generators[i]: its own generator draws its row uniforms, race uniforms and slot
          uniforms, in that order, in place (its draws do not depend on the rest of the batch);
        - otherwise the global generator."""
        keys = keys or {}
        f32 = dict(dtype=torch.float32, device=device)
        num_rows, num_slots = sum(rows_per_request), sum(slots_per_request)
        row_end = list(itertools.accumulate(rows_per_request))
        slot_end = list(itertools.accumulate(slots_per_request))
        rows_of = lambda i: slice(row_end[i] - rows_per_request[i], row_end[i])  # noqa: E731
        slots_of = lambda i: slice(slot_end[i] - slots_per_request[i], slot_end[i])  # noqa: E731
        if len(keys) == len(rows_per_request):
            uniforms = torch.full((num_rows,), 0.5, **f32)  # verification reads no uniform
            race = None
            fresh = torch.empty(num_slots, **f32)
        else:
            uniforms = torch.empty(num_rows, **f32)
            race = torch.empty(num_rows, vocab_size, **f32)
            fresh = torch.empty(num_slots, **f32)
            if len(generators) + len(keys) < len(rows_per_request):  # some use the global generator
                torch.rand(num_rows, out=uniforms)
                torch.rand(num_rows, vocab_size, out=race)
                torch.rand(num_slots, out=fresh)
            for i, g in generators.items():
                if i not in keys:
                    torch.rand(rows_per_request[i], generator=g, out=uniforms[rows_of(i)])
                    torch.rand(rows_per_request[i], vocab_size, generator=g, out=race[rows_of(i)])
                    torch.rand(slots_per_request[i], generator=g, out=fresh[slots_of(i)])
            race = _exponentials(race)
        if keys:
            requests = sorted(keys)
            row_key = np.concatenate([np.full(rows_per_request[i], request_key(keys[i][0])) for i in requests])
            position = np.concatenate([keys[i][1] + np.arange(rows_per_request[i]) for i in requests])
            keyed = keyed_exponentials(*row_keys(row_key, position), vocab_size, device)
            slot_key = np.concatenate([np.full(slots_per_request[i], request_key(keys[i][0])) for i in requests])
            slot_position = np.concatenate([keys[i][1] + np.arange(slots_per_request[i]) for i in requests])
            keyed_fresh = torch.from_numpy(keyed_uniforms(*row_keys(slot_key, slot_position, SALT_FRESH))).to(device)
            if race is None:
                race, fresh = keyed, keyed_fresh
            else:
                row_index = np.concatenate([np.arange(num_rows)[rows_of(i)] for i in requests])
                slot_index = np.concatenate([np.arange(num_slots)[slots_of(i)] for i in requests])
                race[to_device(row_index, race.device)] = keyed
                fresh[to_device(slot_index, fresh.device)] = keyed_fresh
        return cls(uniforms, race, fresh)


def _exponentials(uniforms: torch.Tensor) -> torch.Tensor:
    """Exp(1) as -log(1 - U), in place: the same law as `exponential_`, 4-6x faster on CPU
    (where the race noise was the largest cost of a step at 32 requests)."""
    e = uniforms.neg_().log1p_().neg_()
    # U = 0 (once in 2^24 draws) gives an exact 0, and 0 / 0 would be NaN.
    return e.clamp_min_(torch.finfo(torch.float32).tiny)


@dataclass
class StepOutput:
    output_token_ids: torch.Tensor  # [B, max k_i + 1], committed tokens then PLACEHOLDER_TOKEN_ID
    num_accepted: torch.Tensor  # [B] accepted drafts; num_accepted + 1 tokens are committed
    next_cu_num_draft_tokens: torch.Tensor  # [B]
    next_draft_token_ids: torch.Tensor  # [T']
    next_draft_is_onehot: torch.Tensor  # [T'] bool
    next_draft_probs: torch.Tensor  # [Q, V]: one row per slot that is not one-hot
    next_draft_prob_rows: torch.Tensor  # [T'] row of next_draft_probs, -1 for one-hot slots


RowPass = Callable[..., torch.Tensor]


BACKENDS = ("torch", "inductor", "triton")


def _row_pass(backend: str | None, device: torch.device, num_elements: int) -> RowPass:
    if backend is None:
        backend = os.environ.get("SJDPP_STEP_BACKEND") or (
            "triton" if device.type == "cuda"
            else "inductor" if num_elements >= INDUCTOR_MIN_ELEMENTS
            else "torch"
        )
    if backend == "torch":
        from .row_pass_torch import row_pass_torch

        return row_pass_torch
    if backend == "inductor":
        from .row_pass_torch import row_pass_inductor

        return row_pass_inductor
    if backend == "triton":
        from .row_pass_triton import row_pass_triton

        return row_pass_triton
    raise ValueError(f"unknown step backend {backend!r}; allowed: {', '.join(BACKENDS)}")


def _exclusive_cumsum(x: np.ndarray) -> np.ndarray:
    return np.cumsum(x) - x


def sjdpp_step(
    batch: StepBatch,
    noise: StepNoise,
    fresh: FreshTokens,
    backend: str | None = None,
    next_probs_out: torch.Tensor | None = None,
) -> StepOutput:
    """One SJD++ step over a batch (see the module docstring for the math).

    `next_probs_out` ([>= Q, V], any float dtype) receives the next proposals; a caller that
    steps repeatedly should pass a buffer it keeps (not the one holding `draft_probs`): a fresh
    [Q, V] allocation costs more page faults on CPU than the whole row pass.
    """
    p = batch.target_probs
    device = p.device
    num_rows, vocab = p.shape
    cu = to_host(batch.cu_num_draft_tokens).astype(np.int64)
    drafts = to_host(batch.draft_token_ids).astype(np.int64)
    num_reqs, num_drafts_total = cu.size, drafts.size
    if num_rows != num_drafts_total + num_reqs:
        raise ValueError(
            f"target_probs has {num_rows} rows; expected drafts + requests = "
            f"{num_drafts_total} + {num_reqs}"
        )
    if noise.exponentials.shape != p.shape or noise.uniforms.numel() != num_rows:
        raise ValueError("noise does not match target_probs")
    arange_rows = np.arange(num_rows)

    # Where each row sits: its request, its index in the window, its draft.
    num_drafts = cu.copy()
    num_drafts[1:] -= cu[:-1]
    row_start = _exclusive_cumsum(num_drafts) + np.arange(num_reqs)
    req = np.repeat(np.arange(num_reqs), num_drafts + 1)
    local = arange_rows - row_start[req]
    has_draft = local < num_drafts[req]
    draft_of_row = np.minimum(arange_rows - req, max(num_drafts_total - 1, 0))  # >= 0: req <= row
    if num_drafts_total:
        d = np.where(has_draft, drafts[draft_of_row], 0)
        onehot = to_host(batch.draft_is_onehot)[draft_of_row] | ~has_draft
    else:
        d = np.zeros(num_rows, dtype=np.int64)
        onehot = np.ones(num_rows, dtype=bool)
    has_q_rows = batch.draft_probs is not None and batch.draft_probs.shape[0] > 0
    if not has_q_rows:
        onehot = np.ones(num_rows, dtype=bool)
    q_row = draft_of_row
    if batch.draft_prob_rows is not None and num_drafts_total:
        q_row = to_host(batch.draft_prob_rows).astype(np.int64)[draft_of_row]
    q_row = np.where(onehot, 0, q_row)
    d_on_device = to_device(d, device)
    p_d = to_host(p[to_device(arange_rows, device), d_on_device].float())
    q_d = np.ones_like(p_d)
    if has_q_rows:
        q_d = np.where(onehot, q_d, to_host(batch.draft_probs[to_device(q_row, device), d_on_device].float()))
    ratio_pass = to_host(noise.uniforms) * q_d < p_d

    greedy_requests = to_host(batch.greedy)
    greedy = greedy_requests[req]
    argmax = np.zeros(num_rows, dtype=np.int64)
    if greedy_requests.any():
        greedy_rows = np.flatnonzero(greedy)
        argmax[greedy_rows] = to_host(p[to_device(greedy_rows, device)].argmax(-1))

    # Gumbel-coupled rows: every row's race winner, before anything is decided.
    gumbel = np.zeros(num_rows, dtype=bool) if batch.gumbel is None else to_host(batch.gumbel)[req] & ~greedy
    winner = np.zeros(num_rows, dtype=np.int64)
    if gumbel.any():
        race_rows = np.flatnonzero(gumbel)
        none = to_device(np.full(race_rows.size, -1, dtype=np.int64), device)
        winner[race_rows] = to_host(_row_pass(backend, device, p.numel())(
            target_probs=p, draft_probs=None, exponentials=noise.exponentials,
            rows=to_device(race_rows, device), subtract_draft_row=none, subtract_onehot=none,
            draw=to_device(np.ones(race_rows.size, dtype=bool), device), q_dest=none,
            next_probs=p[:0],
        ))

    # a_i: the first row that is not an accepted draft (the bonus row is never one): the
    # minimum over the request's rows, accepted ones counted as num_rows.
    accepted = has_draft & np.where(greedy, d == argmax, np.where(gumbel, d == winner, ratio_pass))
    num_accepted = np.minimum.reduceat(np.where(accepted, num_rows, local), row_start) if num_reqs else local[:0]
    a = num_accepted[req]
    is_recovery = local == a
    slot = local - a - 1
    next_len = to_host(batch.next_window_len).astype(np.int64)
    in_window = (local > a) & (slot < next_len[req])

    reuse = to_host(batch.reuse)[req]
    ratio = ~greedy & ~gumbel  # verified by the ratio test
    keep = in_window & has_draft & ratio & (
        ((reuse == REUSE_COUPLED) & ratio_pass)
        | ((reuse == REUSE_CONFIDENCE) & (p_d >= to_host(batch.threshold)[req]))
    )
    subtract_q = ratio & has_draft & (is_recovery | (in_window & (reuse == REUSE_COUPLED)))
    draw = ratio & (is_recovery | (in_window & ~keep))
    write_q = ratio & in_window & ~(keep & (reuse == REUSE_CONFIDENCE))

    next_cu = np.cumsum(next_len)
    num_next = int(next_cu[-1]) if num_reqs else 0
    dest = _exclusive_cumsum(next_len)[req] + slot
    # Only slots with a full q get a row, packed in slot order (rows are already in slot order).
    q_dest = _exclusive_cumsum(write_q.astype(np.int64))
    num_q = int(write_q.sum())
    if next_probs_out is None:
        next_probs = torch.empty(num_q, vocab, dtype=p.dtype, device=device)
    elif next_probs_out.shape[0] < num_q or next_probs_out.shape[1] != vocab:
        raise ValueError(f"next_probs_out {tuple(next_probs_out.shape)} is smaller than {(num_q, vocab)}")
    else:
        next_probs = next_probs_out[:num_q]

    rows = np.flatnonzero(draw | write_q)
    raced = _row_pass(backend, device, p.numel())(
        target_probs=p,
        draft_probs=batch.draft_probs,
        exponentials=noise.exponentials,
        rows=to_device(rows, device),
        subtract_draft_row=to_device(np.where(subtract_q & ~onehot, q_row, -1)[rows], device),
        subtract_onehot=to_device(np.where(subtract_q & onehot, d, -1)[rows], device),
        draw=to_device(draw[rows], device),
        q_dest=to_device(np.where(write_q, q_dest, -1)[rows], device),
        next_probs=next_probs,
    )
    token = np.where(greedy, argmax, np.where(gumbel, winner, np.where(keep, d, 0)))
    token[rows] = np.where(draw[rows], to_host(raced), token[rows])

    max_drafts = int(num_drafts.max()) if num_reqs else 0
    output = np.full((num_reqs, max_drafts + 1), PLACEHOLDER_TOKEN_ID, dtype=np.int64)
    committed = local <= a
    output[req[committed], local[committed]] = np.where(is_recovery, token, d)[committed]

    next_tokens = np.zeros(num_next, dtype=np.int64)
    next_onehot = np.ones(num_next, dtype=bool)
    next_prob_rows = np.full(num_next, -1, dtype=np.int64)
    next_tokens[dest[in_window]] = token[in_window]
    next_onehot[dest[in_window]] = ~write_q[in_window]
    next_prob_rows[dest[write_q]] = q_dest[write_q]
    num_redrafted = np.minimum(num_drafts - num_accepted, next_len)
    fill_fresh_tokens(
        next_tokens, next_onehot, next_len, num_redrafted, output, num_accepted + 1, fresh,
        to_host(noise.fresh_uniforms),
    )
    return StepOutput(
        *(to_device(x, device) for x in (output, num_accepted, next_cu, next_tokens, next_onehot)),
        next_probs,
        to_device(next_prob_rows, device),
    )
