"""The SJD++ step's memory: the reserve vLLM keeps out of the KV cache for it, and the cap on a
pass's drafts that holds it to the server's `step_memory_gib` at large vocabularies.

vLLM's profile run samples one row per request; an SJD++ pass samples every window position,
each a row over the vocabulary V, so the step's rows are reserved here.  ROW_BYTES per row
element: the guided head's output of both branches in the model's dtype (4 bytes in bfloat16;
one branch in the paired layout, so the reserve is an upper bound there) and guidance's float32
temporaries, gone before sampling; then the guided logits, a copy of them where logprobs are
asked for, vLLM's top-k / top-p (top-p sorts: float32 values and int64
indices), the probabilities and the race noise (the Triton kernel writes its output only).  Per
draft with a full proposal, the two q-row buffers (Q_ROW_BYTES), and per request its first row
kept for the fallback.  `tests/test_step_memory.py` counts every tensor of the step's own code
while it lives, at Emu3's and Janus-Pro's vocabularies: 35.6 bytes per row element at the peak,
q rows and noise included, against this reserve's 39.8 (the reserve before, 5 float32 rows per
position, gave 27.8).

    reserve(d) = V * (ROW_BYTES * rows + 8 * d + 4 * S),   rows = min(S + d, max_num_batched_tokens)

for S = max_num_seqs requests and d drafts in a pass.  With --max-num-batched-tokens 8192, an
Emu3 server (V = 184622) at 256 sequences would reserve 56 GiB for windows of 32, and a Janus-Pro
server (V = 16384) 2.6 GiB for windows of 16, so the drafts of a pass are capped (`max_drafts`)
to fit `step_memory_gib` (default 2 GiB): 60 drafts per pass for Emu3 there (283 at 8 sequences:
every window of 32), 3046 for Janus; the controller's windows are shared out under the cap.
"""

from __future__ import annotations

ROW_BYTES = 32  # with the head's output in a 2-byte dtype; 4 more per element for float32 models
Q_ROW_BYTES = 8  # per draft with a full proposal: the two q-row buffers, float32
FIRST_ROW_BYTES = 4  # per request: its first row, kept for the fallback


def row_bytes(dtype=None) -> int:
    """ROW_BYTES for a model served in `dtype` (a torch dtype; None: a 2-byte one): the head's
    output of both branches takes twice its element size."""
    size = getattr(dtype, "itemsize", 2)
    return ROW_BYTES + 2 * (size - 2)


def max_drafts(step_memory_gib: float, max_num_seqs: int, vocab: int, dtype=None) -> int:
    """The most drafts one pass may verify within `step_memory_gib` (>= 0).  Under the cap the
    runtime shares a pass's drafts out evenly (`window_budget`), a seeded request's pinned window
    too: where the cap binds, such a request's draws follow the load (the same law, other
    samples)."""
    per_element = step_memory_gib * 2**30 / vocab
    rows = row_bytes(dtype)
    return max(int((per_element - (rows + FIRST_ROW_BYTES) * max_num_seqs) // (rows + Q_ROW_BYTES)), 0)


def pass_drafts(max_num_seqs: int, max_num_batched_tokens: int, k: int, budget: int | str | None, cap: int) -> int:
    """The most drafts a pass verifies: every window of every request, within the batch's tokens,
    the draft-token budget (a number; "auto" may draft every window) and the memory cap."""
    drafts = min(max_num_seqs * k, max(max_num_batched_tokens - max_num_seqs, 0), cap)
    return min(drafts, budget) if isinstance(budget, int) else drafts


def step_memory_bytes(max_num_seqs: int, max_num_batched_tokens: int, drafts: int, vocab: int, dtype=None) -> int:
    """The reserve for a pass of `drafts` drafts over `max_num_seqs` requests (the module's
    formula)."""
    rows = min(max_num_seqs + drafts, max_num_batched_tokens)
    return vocab * (row_bytes(dtype) * rows + Q_ROW_BYTES * drafts + FIRST_ROW_BYTES * max_num_seqs)
