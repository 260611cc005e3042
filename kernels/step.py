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
Token for token, that is, as long as the forward gives a position the same p_m whether it is
computed in a pass of k + 1 window rows or of one (kernels whose results do not depend on the
batch's shape); the law is exact regardless.

u_j serves the verification of rows j <= a and the coupling test of rows j > a: never both, so
each row needs one uniform and the two uses stay independent.

Every draw is an exponential race: argmax_v w(v) / E_v with E_v ~ Exp(1) is distributed as
norm(w), and needs one pass over the row.  Where a residual is empty (p = q up to rounding) the
race falls back to p.

The per-row decisions above are scalar work on O(rows) elements and are computed here, once, in
NumPy on the host for every backend (`host.py` says why, and counts the crossings: a
Gumbel-coupled step reads the device once, for the winners and argmaxes, and writes it once); the heavy part, a pass over whole
vocabulary rows (residual, race, q write), is the row pass with implementations that must agree
exactly: `row_pass_torch` (CPU: eager PyTorch for small steps, the same code fused by
TorchInductor for large ones) and `row_pass_triton` (CUDA: one fused kernel, each probability
row read once and each q row written once).  On CPU a batch keyed throughout (Gumbel coupling,
the default) is raced on the host where a token can win instead (`keyed_race`: the same winners;
the dense race where more than half of the rows is positive). `backend=` or the environment variable
SJDPP_STEP_BACKEND picks one: torch | inductor | triton.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .fresh import FreshTokens, fill_fresh_tokens
from .host import INDUCTOR_MIN_ELEMENTS, fetch, host_array, send, upload
from .keyed_race import KeyedRows
from .noise import SALT_FRESH, SALT_RACE, keyed_uniforms, request_key, row_keys

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
    """The step's randomness, supplied by the caller so that backends and seeds are comparable.

    Where every row is keyed by position (`keyed`), `exponentials` may be None: on CPU the step
    races keyed rows only where a token can win (`KeyedRows.race`), and `race_noise()` computes
    the dense rows for a reader that needs them."""

    uniforms: torch.Tensor  # [T + B] float32 in [0, 1): one per target row
    exponentials: torch.Tensor | None  # [T + B, V] float32 Exp(1), > 0: one race per target row
    fresh_uniforms: torch.Tensor | np.ndarray  # [T'] float32 in [0, 1): one per next-window slot
    keyed: KeyedRows | None = None  # every row's key, where every row is keyed

    def __post_init__(self):
        if self.exponentials is None and self.keyed is None:
            raise ValueError("StepNoise needs its exponentials or the keys that give them")

    def race_noise(self) -> torch.Tensor:
        """The [T + B, V] exponentials: as given, or computed from the keys (at each call)."""
        return self.keyed.exponentials() if self.exponentials is None else self.exponentials

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, vocabulary) of the race noise, without computing it."""
        if self.exponentials is None:
            return (self.keyed.a.size, self.keyed.vocab_size)
        return tuple(self.exponentials.shape)

    def to(self, device: torch.device | str) -> "StepNoise":
        """The same noise with its tensors on `device` (keyed rows not computed yet are computed
        there when read)."""
        device = torch.device(device)
        move = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
        keyed = None if self.keyed is None else dataclasses.replace(self.keyed, device=device)
        return StepNoise(move(self.uniforms), move(self.exponentials), move(self.fresh_uniforms), keyed)

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
          raced with E(key, position + j, .); what Gumbel-coupled verification needs (it reads
          no row uniform: a batch keyed throughout gets none);
        - generators[i]: its own generator draws its row uniforms, race uniforms and slot
          uniforms, in that order, in place (its draws do not depend on the rest of the batch);
        - otherwise the global generator."""
        keys = keys or {}
        device = torch.device(device)
        f32 = dict(dtype=torch.float32, device=device)
        num_rows, num_slots = sum(rows_per_request), sum(slots_per_request)
        row_end = list(itertools.accumulate(rows_per_request))
        slot_end = list(itertools.accumulate(slots_per_request))
        rows_of = lambda i: slice(row_end[i] - rows_per_request[i], row_end[i])  # noqa: E731
        slots_of = lambda i: slice(slot_end[i] - slots_per_request[i], slot_end[i])  # noqa: E731
        if keys and len(keys) == len(rows_per_request):
            # Keyed rows are Gumbel-verified, which reads no row uniform: none is drawn.
            uniforms = torch.full((num_rows,), 0.5, **f32)
            race = fresh = None
        else:
            uniforms = torch.empty(num_rows, **f32)
            race = torch.empty(num_rows, vocab_size, **f32)
            fresh = torch.empty(num_slots, **f32)
            if len(set(generators) | set(keys)) < len(rows_per_request):  # some use the global generator
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
            # The race rows' words and the fresh slots' in one call (each NumPy call on a few
            # dozen rows costs as much as on one).
            counts = [rows_per_request[i] for i in requests] + [slots_per_request[i] for i in requests]
            keyed_rows = sum(counts[: len(requests)])
            request_keys = np.array([request_key(keys[i][0]) for i in requests], dtype=np.uint64)
            first = np.array([keys[i][1] for i in requests] * 2, dtype=np.int64)
            position = np.repeat(first - np.cumsum([0] + counts[:-1]), counts) + np.arange(sum(counts))
            salt = np.repeat(np.array([SALT_RACE, SALT_FRESH], dtype=np.uint32), [keyed_rows, sum(counts) - keyed_rows])
            a, b = row_keys(np.tile(request_keys, 2).repeat(counts), position, salt)
            keyed = KeyedRows(a[:keyed_rows], b[:keyed_rows], vocab_size, device)
            keyed_fresh = keyed_uniforms(a[keyed_rows:], b[keyed_rows:])
            if race is None:
                # The slot uniforms stay on the host, where the plan reads them; on CPU the race
                # noise is computed where the step needs it (`KeyedRows.race`), on CUDA now.
                return cls(uniforms, None if device.type == "cpu" else keyed.exponentials(), keyed_fresh, keyed)
            row_index = np.concatenate([np.arange(num_rows)[rows_of(i)] for i in requests])
            slot_index = np.concatenate([np.arange(num_slots)[slots_of(i)] for i in requests])
            row_index_t, slot_index_t = upload(row_index, slot_index, device=race.device)
            race[row_index_t] = keyed.exponentials()
            uniforms[row_index_t] = 0.5  # Gumbel verification reads none
            fresh[slot_index_t] = torch.from_numpy(keyed_fresh).to(fresh.device, non_blocking=True)
        return cls(uniforms, race, fresh)


def _exponentials(uniforms: torch.Tensor) -> torch.Tensor:
    """Exp(1) as -log(1 - U), in place: the same law as `exponential_`, 4-6x faster on CPU
    (where the race noise was the largest cost of a step at 32 requests)."""
    e = uniforms.neg_().log1p_().neg_()
    # U = 0 (once in 2^24 draws) gives an exact 0, and 0 / 0 would be NaN.
    return e.clamp_min_(torch.finfo(torch.float32).tiny)


@dataclass
class StepHost:
    """The step's outputs as the plan made them, on the host: what the caller's bookkeeping
    reads without another device-to-host copy."""

    output_token_ids: np.ndarray
    num_accepted: np.ndarray
    next_cu_num_draft_tokens: np.ndarray
    next_draft_token_ids: np.ndarray
    next_draft_is_onehot: np.ndarray
    next_draft_prob_rows: np.ndarray


@dataclass
class StepOutput:
    output_token_ids: torch.Tensor  # [B, max k_i + 1], committed tokens then PLACEHOLDER_TOKEN_ID
    num_accepted: torch.Tensor  # [B] accepted drafts; num_accepted + 1 tokens are committed
    next_cu_num_draft_tokens: torch.Tensor  # [B]
    next_draft_token_ids: torch.Tensor  # [T']
    next_draft_is_onehot: torch.Tensor  # [T'] bool
    next_draft_probs: torch.Tensor  # [Q, V]: one row per slot that is not one-hot
    next_draft_prob_rows: torch.Tensor  # [T'] row of next_draft_probs, -1 for one-hot slots
    host: StepHost | None = None  # the same, but next_draft_probs, on the host


RowPass = Callable[..., torch.Tensor]


BACKENDS = ("torch", "inductor", "triton")


def default_backend(device: torch.device, num_elements: int) -> str:
    """The row pass a step of `num_elements` probabilities on `device` runs unless told
    otherwise: SJDPP_STEP_BACKEND where set, else Triton on CUDA, TorchInductor's fused PyTorch
    from INDUCTOR_MIN_ELEMENTS up, eager PyTorch below."""
    return os.environ.get("SJDPP_STEP_BACKEND") or (
        "triton" if device.type == "cuda"
        else "inductor" if num_elements >= INDUCTOR_MIN_ELEMENTS
        else "torch"
    )


def _row_pass(backend: str | None, device: torch.device, num_elements: int) -> RowPass:
    if backend is None:
        backend = default_backend(device, num_elements)
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


def compile_cpu_step(vocab_size: int, device: torch.device | str = "cpu") -> None:
    """Compile what a CPU step fuses with TorchInductor (the row pass and the keyed noise) at the
    shapes a step meets, so that no step waits for the compiler.  Raises what TorchInductor
    raises where it cannot compile (the first error, after trying both); what failed then runs
    eagerly.

    Compiled in inference mode, where vLLM runs the step (its `execute_model` and
    `sample_tokens`): Dynamo guards on the grad mode, and compiled outside it, the first step
    large enough for TorchInductor compiled again (7 graphs; 350 ms of a step at 64 digit
    images with 16 drafts each, on 2 CPU cores)."""
    from .noise import compile_keyed_exponentials
    from .row_pass_torch import compile_inductor

    errors = []
    for compile_now in (compile_inductor, compile_keyed_exponentials):
        try:
            with torch.inference_mode():
                compile_now(vocab_size, device)
        except Exception as error:  # noqa: BLE001 -- re-raised below, after the other one
            errors.append(error)
    if errors:
        raise errors[0]


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
    cu = host_array(batch.cu_num_draft_tokens).astype(np.int64)
    drafts = host_array(batch.draft_token_ids).astype(np.int64)
    num_reqs, num_drafts_total = cu.size, drafts.size
    if num_rows != num_drafts_total + num_reqs:
        raise ValueError(
            f"target_probs has {num_rows} rows; expected drafts + requests = "
            f"{num_drafts_total} + {num_reqs}"
        )
    if noise.shape != tuple(p.shape) or noise.uniforms.numel() != num_rows:
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
        # A negative draft is vLLM's placeholder (uniform-decode padding), not a token: its row
        # verifies nothing and samples from p, as a row without a draft does.
        has_draft &= drafts[draft_of_row] >= 0
        d = np.where(has_draft, drafts[draft_of_row], 0)
        onehot = host_array(batch.draft_is_onehot)[draft_of_row] | ~has_draft
    else:
        d = np.zeros(num_rows, dtype=np.int64)
        onehot = np.ones(num_rows, dtype=bool)
    has_q_rows = batch.draft_probs is not None and batch.draft_probs.shape[0] > 0
    if not has_q_rows:
        onehot = np.ones(num_rows, dtype=bool)
    q_row = draft_of_row
    if batch.draft_prob_rows is not None and num_drafts_total:
        q_row = host_array(batch.draft_prob_rows).astype(np.int64)[draft_of_row]
    q_row = np.where(onehot, 0, q_row)
    greedy = host_array(batch.greedy).astype(bool)[req]
    gumbel = np.zeros(num_rows, dtype=bool) if batch.gumbel is None else host_array(batch.gumbel).astype(bool)[req] & ~greedy
    ratio = ~greedy & ~gumbel  # verified by the ratio test
    next_len = host_array(batch.next_window_len).astype(np.int64)
    num_next = int(next_len.sum())

    # What the plan reads from the device, computed there and fetched in one copy: greedy rows'
    # argmax, Gumbel rows' race winners, and for the ratio test p and q at the drafts.
    race_rows = np.flatnonzero(gumbel)
    # Without ratio rows every row is raced (greedy rows' winners unused): no index list to send.
    race_all = race_rows.size > 0 and not ratio.any()
    if race_all:
        race_rows = arange_rows
    upload = ([race_rows] if race_rows.size and not race_all else []) + ([d, q_row] if ratio.any() else [])
    uploaded = iter(send(*upload, device=device) if upload else [])
    reads: dict[str, torch.Tensor] = {}
    if greedy.any():
        reads["argmax"] = p.argmax(-1)
    keyed_winners = None
    if race_all and noise.exponentials is None and (backend or default_backend(device, p.numel())) != "triton":
        keyed_winners = noise.keyed.race(p)  # on the host, where a token can win; None: not here
    if race_rows.size and keyed_winners is None:
        rows_t = torch.arange(num_rows, device=device) if race_all else next(uploaded)
        none = torch.full_like(rows_t, -1)
        reads["winner"] = _row_pass(backend, device, p.numel())(
            target_probs=p, draft_probs=None, exponentials=noise.race_noise(), rows=rows_t,
            subtract_draft_row=none, subtract_onehot=none, draw=torch.ones_like(rows_t, dtype=torch.bool),
            q_dest=none, next_probs=p[:0],
        )
    if ratio.any():
        d_t, q_row_t = next(uploaded), next(uploaded)
        reads["p_d"] = p[torch.arange(num_rows, device=device), d_t].float()
        if has_q_rows:
            reads["q_d"] = batch.draft_probs[q_row_t, d_t].float()
        reads["uniforms"] = noise.uniforms
    fresh_uniforms = noise.fresh_uniforms
    on_device = isinstance(fresh_uniforms, torch.Tensor) and fresh_uniforms.device.type != "cpu"
    if num_next and on_device:
        reads["fresh"] = fresh_uniforms
    fetched = dict(zip(reads, fetch(*reads.values()))) if reads else {}
    if "fresh" in fetched:
        fresh_uniforms = fetched["fresh"]
    else:
        fresh_uniforms = np.zeros(0, dtype=np.float32) if on_device else host_array(fresh_uniforms)

    argmax = fetched.get("argmax", np.zeros(num_rows, dtype=np.int64))
    winner = np.zeros(num_rows, dtype=np.int64)
    winner[race_rows] = keyed_winners if keyed_winners is not None else fetched.get("winner", winner[race_rows])
    p_d = fetched.get("p_d", np.zeros(num_rows, dtype=np.float32))
    q_d = np.where(onehot, 1.0, fetched["q_d"]) if "q_d" in fetched else np.ones(num_rows, dtype=np.float32)
    ratio_pass = ratio & (fetched["uniforms"] * q_d < p_d) if ratio.any() else np.zeros(num_rows, dtype=bool)

    # a_i: the first row that is not an accepted draft (the bonus row is never one): the
    # minimum over the request's rows, accepted ones counted as num_rows.
    accepted = has_draft & np.where(greedy, d == argmax, np.where(gumbel, d == winner, ratio_pass))
    num_accepted = np.minimum.reduceat(np.where(accepted, num_rows, local), row_start) if num_reqs else local[:0]
    a = num_accepted[req]
    is_recovery = local == a
    slot = local - a - 1
    in_window = (local > a) & (slot < next_len[req])

    reuse = host_array(batch.reuse)[req]
    keep = in_window & has_draft & ratio & (
        ((reuse == REUSE_COUPLED) & ratio_pass)
        | ((reuse == REUSE_CONFIDENCE) & (p_d >= host_array(batch.threshold)[req]))
    )
    subtract_q = ratio & has_draft & (is_recovery | (in_window & (reuse == REUSE_COUPLED)))
    draw = ratio & (is_recovery | (in_window & ~keep))
    write_q = ratio & in_window & ~(keep & (reuse == REUSE_CONFIDENCE))

    next_cu = np.cumsum(next_len)
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

    token = np.where(greedy, argmax, np.where(gumbel, winner, np.where(keep, d, 0)))
    rows = np.flatnonzero(draw | write_q)
    if rows.size:  # the ratio test's residual draws and proposal rows: a second crossing
        rows_t, subtract_draft_row, subtract_onehot, draw_t, q_dest_t = send(
            rows, np.where(subtract_q & ~onehot, q_row, -1)[rows], np.where(subtract_q & onehot, d, -1)[rows],
            draw[rows], np.where(write_q, q_dest, -1)[rows], device=device,
        )
        raced = _row_pass(backend, device, p.numel())(
            target_probs=p, draft_probs=batch.draft_probs, exponentials=noise.race_noise(), rows=rows_t,
            subtract_draft_row=subtract_draft_row, subtract_onehot=subtract_onehot, draw=draw_t, q_dest=q_dest_t,
            next_probs=next_probs,
        )
        (raced_host,) = fetch(raced)
        token[rows] = np.where(draw[rows], raced_host, token[rows])

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
        next_tokens, next_onehot, next_len, num_redrafted, output, num_accepted + 1, fresh, fresh_uniforms,
    )
    host = StepHost(output, num_accepted, next_cu, next_tokens, next_onehot, next_prob_rows)
    sent = send(*(getattr(host, f.name) for f in dataclasses.fields(host)), device=device)
    return StepOutput(*sent[:5], next_probs, sent[5], host=host)
