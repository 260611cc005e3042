"""Stream grids (`kernels.grid.StreamGrid`): what each generated position may hold, read from a
folder, and followed by fresh drafts.  The engine's masking is tested in test_engine_grid.py."""

from __future__ import annotations

import numpy as np
import pytest

from vllm_sjdpp.digits.tokens import EOI, EOL, STREAM_GRID, codes_to_ids
from vllm_sjdpp.families.base import ImageFamily
from vllm_sjdpp.kernels import FreshTokens, StreamGrid
from vllm_sjdpp.kernels.fresh import fill_fresh_tokens
from vllm_sjdpp.kernels.grid import CODE, FREE


def test_a_digit_stream_holds_its_grid_and_a_misplaced_eol_does_not():
    rng = np.random.default_rng(0)
    stream = codes_to_ids(rng.integers(0, 256, (16, 16)))
    assert len(stream) == STREAM_GRID.length
    assert STREAM_GRID.holds(np.arange(len(stream)), stream).all()
    broken = list(stream)
    broken[3], broken[16] = EOL, 7  # an <eol> inside a row, a code where a row ends
    assert np.flatnonzero(~STREAM_GRID.holds(np.arange(len(broken)), broken)).tolist() == [3, 16]
    assert STREAM_GRID.slot_tokens(np.array([-1, 272, 273])).tolist() == [FREE, EOI, FREE]


def test_slot_classes_and_their_masks():
    grid = StreamGrid(2, 44, codes_per_row=3, rows=3, end_of_row=44, closing=(45, 46))
    classes = grid.slot_classes(np.array([-1, 0, 3, 11, 12, 13, 14]))
    allowed = ~grid.forbidden_masks(48)[classes]
    assert [np.flatnonzero(a).tolist() for a in allowed] == [
        list(range(48)), list(range(2, 44)), [44], [44], [45], [46], list(range(48))
    ]


def config(**keys):
    return type("HFConfig", (), {"vocab_size": 48, "architectures": ["GuidedLlamaForCausalLM"], **keys})()


GOOD = {"code_range": [2, 44], "codes_per_row": 3, "rows": 3, "end_of_row": 44, "closing": [45, 46]}


def test_grid_read_from_config_json_of_a_guided_llama():
    assert ImageFamily.stream_grid(config()) is None
    assert ImageFamily.stream_grid(config(sjdpp_grid=GOOD)) == StreamGrid(2, 44, 3, 3, 44, (45, 46))
    # Served as a plain Llama (hf_overrides), the model masks nothing: no grid for the drafts either.
    assert ImageFamily.stream_grid(config(sjdpp_grid=GOOD, architectures=["LlamaForCausalLM"])) is None


def test_sjdpp_defaults_follow_the_grid():
    """Fresh drafts among the codes, rows as wide as the stream's; config.json "sjdpp" overrides."""
    assert ImageFamily.sjdpp_defaults(config(sjdpp_grid=GOOD)) == {
        "fresh_token_range": [2, 44], "row_width": 4, "init": "above"
    }
    assert ImageFamily.sjdpp_defaults(config(sjdpp_grid=GOOD, sjdpp={"init": "left"}))["init"] == "left"
    assert ImageFamily.sjdpp_defaults(config()) == {}


@pytest.mark.parametrize("spec", [
    {**GOOD, "rows": 0},
    {**GOOD, "code_range": [44, 2]},
    {**GOOD, "end_of_row": 10},  # among the codes
    {**GOOD, "closing": [45, -1]},  # a sentinel, not an id
    {**GOOD, "rows": 2.5},
    {**GOOD, "shape": [3, 3]},
    {"rows": 3},
    [2, 44],
])
def test_bad_grids_are_refused_naming_the_key(spec):
    with pytest.raises(ValueError, match="sjdpp_grid"):
        ImageFamily.stream_grid(config(sjdpp_grid=spec))


def test_grid_ids_past_the_logits_are_refused_at_start_up():
    rule = {"keep_token_ids": [0], "pad_token_id": 47}
    ImageFamily.check(config(sjdpp_grid=GOOD, sjdpp_guidance=rule), {})
    with pytest.raises(ValueError, match="'sjdpp_grid': token id 48 outside the model's 48 logits"):
        ImageFamily.check(config(sjdpp_grid={**GOOD, "closing": [45, 48]}, sjdpp_guidance=rule), {})


def fresh_windows(init: str, grid: StreamGrid | None, seed: int, requests: int = 64, window: int = 12):
    """Fresh slots of `requests` windows, each after a random point of a well-formed stream:
    (stream indices, tokens) of every fresh slot."""
    rng = np.random.default_rng(seed)
    real = StreamGrid(2, 44, codes_per_row=3, rows=3, end_of_row=44, closing=(45, 46))
    stream = [2 + int(rng.integers(0, 42)) if real.slot_tokens(g) == CODE else int(real.slot_tokens(g)) for g in range(real.length)]
    made = rng.integers(1, 4, requests)  # tokens committed before the step
    committed = rng.integers(1, 3, requests)  # committed by the step
    redrafted = rng.integers(0, 3, requests)
    history = np.array([[stream[g] for g in range(m - 8, m)] if m >= 8 else [-1] * (8 - m) + stream[:m] for m in made])
    committed_tokens = np.array([stream[m : m + 2] for m in made])
    next_len = np.full(requests, window)
    tokens = np.concatenate([rng.integers(2, 44, r).tolist() + [-1] * (window - r) for r in redrafted]).astype(np.int64)
    onehot = np.zeros(tokens.size, dtype=bool)
    fresh = FreshTokens.build([init] * requests, [range(2, 44)] * requests, history, [4] * requests, grid, made)
    fill_fresh_tokens(tokens, onehot, next_len, redrafted, committed_tokens, committed, fresh, rng.random(tokens.size, dtype=np.float32))
    slot = np.tile(np.arange(window), requests)
    req = np.repeat(np.arange(requests), window)
    index = made[req] + committed[req] + slot
    is_fresh = slot >= redrafted[req]
    return real, index[is_fresh], tokens[is_fresh]


@pytest.mark.parametrize("init", ["random", "left", "above"])
def test_fresh_drafts_follow_the_grid(init):
    """End-of-row and closing tokens at their slots, codes elsewhere, whatever the prior copies.
    Broken variant: without the grid, drafts break it (a code slot copying an <eol>, an <eol> slot
    drawing a code)."""
    grid, index, tokens = fresh_windows(init, StreamGrid(2, 44, 3, 3, 44, (45, 46)), seed=1)
    assert grid.holds(index, tokens).all()
    _, index, tokens = fresh_windows(init, None, seed=1)
    assert not grid.holds(index, tokens).all()
