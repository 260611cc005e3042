"""Folder fuzz: no model folder can make a draft the model cannot embed, nor kill the engine at
request time.

Tiny Janus folders (tests/tiny_janus.py) and guided-Llama folders (tests/tiny_llama.py) are drawn
with hypothesis (derandomized): text vocabularies smaller than, equal to and larger than the
codebook, special ids anywhere in the vocabulary and sometimes past it in generation_config.json,
grids that do and do not match vision_config.num_image_tokens, guidance rule ids past the
vocabulary, and SJD++ defaults in config.json "sjdpp" (row widths from 1 to past the image or the
context, fresh-token ranges past the logits).

Each folder is started as an in-process SJD++ engine.  An oracle, written from what the folder's
values contradict, says whether it must be refused; then either
- the start raises, with a message naming a key of something the folder broke, or
- it serves one batch of a sampled and a greedy request, both guided (scale 3), each the full
  image (or 16 tokens for a Llama), every token a code the model samples, no draft cut by the
  proposer's guard and no error logged by the plugin; and then serves one more request.
Nothing else is acceptable: a start-up error the oracle did not predict, a folder the oracle says
is broken that starts, or any failure at request time.

Engines take a few seconds each to start on CPU: the examples per family are few, and explicit
`@example`s cover every category (text vocabulary <, == and > the codebook, an id past the
vocabulary, a grid mismatch, a row past the image or the context, a fresh range past the logits,
good folders).  No shrinking: every example costs an engine, and each one is small already.
"""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, Phase, event, example, given, settings
from hypothesis import strategies as st

from stall_guard import StallGuard
from tiny_janus import SPECIAL_TOKENS, JanusShape, build_tiny_janus
from tiny_llama import build_tiny_llama, set_engine_env
from vllm_sjdpp.engine.runtime import runtime_of

set_engine_env()

SCALE = 3.0  # guidance on every request
JANUS_MAX_MODEL_LEN = 64  # a chat prompt (~12 tokens) and at most 20 image tokens
LLAMA_MAX_MODEL_LEN, LLAMA_TOKENS = 32, 16
# RSS may grow this much over the whole file (an engine's KV cache is 1 GiB: one leaked engine fails).
RSS_GROWTH_LIMIT = 768 * 2**20
JANUS_PROMPTS = ("a red dog", "the big green tree")

SETTINGS = dict(
    derandomize=True, database=None, deadline=None, phases=(Phase.explicit, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
SPECIAL_NAMES = tuple(SPECIAL_TOKENS)  # bos, eos, pad, unk, boi, eoi, image, user, assistant
RULE_KEYS = ("bos_token_id", "pad_token_id", "boi_token_id")  # Janus's unconditional rule, generation_config.json

# What each example did, for a run with -s (the counts and messages of the report).
OUTCOMES: list[tuple[str, str, str]] = []
_rss_baseline: list[int] = []


def mostly(valid, edge, one_in: int = 4):
    """`valid`, and `edge` about once in `one_in` draws (one_of would merge repeated branches)."""
    return st.integers(0, one_in - 1).flatmap(lambda i: edge if i == 1 else valid)


# Outcome checks shared by both families --------------------------------------------------------


def start_engine(folder: Path, k: int, max_model_len: int):
    from vllm import LLM

    llm = LLM(
        str(folder), skip_tokenizer_init=True, enforce_eager=True, max_model_len=max_model_len, dtype="float32",
        seed=0, speculative_config={"method": "sjdpp", "num_speculative_tokens": k, "draft_token_budget": None},
    )
    StallGuard(llm)
    return llm


def check_refusal(family: str, error: Exception, broken: list[tuple[str, set[str]]]) -> None:
    message = str(error)
    OUTCOMES.append((family, "refused", message))
    assert broken, f"a {family} folder the oracle finds sound was refused at start-up: {message}"
    named = [what for what, keys in broken if any(key in message for key in keys)]
    assert named, (
        f"the start-up error names none of the keys of what the folder broke "
        f"({'; '.join(f'{what}: {sorted(keys)}' for what, keys in broken)}): {message}"
    )


class PluginErrors(logging.Handler):
    """ERROR records of the plugin's logger (the draft guard's cuts, the proposer's failures)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def serve_and_check(llm, family: str, prompts: list[list[int]], tokens: int, logits: int) -> None:
    """A sampled and a greedy guided request in one batch, then one more request."""
    from vllm import SamplingParams

    def params(**kw):
        return SamplingParams(ignore_eos=True, detokenize=False, max_tokens=tokens, extra_args={"guidance_scale": SCALE}, **kw)

    drafter = runtime_of(llm)
    errors = PluginErrors()
    logger = logging.getLogger("vllm.sjdpp")
    logger.addHandler(errors)
    try:
        outs = llm.generate(
            [{"prompt_token_ids": prompts[0]}] * 2, [params(temperature=1.0, seed=7), params(temperature=0.0)],
            use_tqdm=False,
        )
        again = llm.generate([{"prompt_token_ids": prompts[1]}], params(temperature=0.0), use_tqdm=False)
    finally:
        logger.removeHandler(errors)
    images = [list(o.outputs[0].token_ids) for o in outs + again]
    for image in images:
        assert len(image) == tokens, (len(image), tokens)
        assert all(0 <= t < logits for t in image), f"tokens outside [0, {logits}): {image}"
    assert drafter.guard.cut == 0 and not errors.messages, errors.messages
    assert drafter.guard.drafts > 0  # SJD++ drafted
    OUTCOMES.append((family, "served", f"{len(images)} x {tokens} tokens, {drafter.guard.drafts} drafts"))


class TracebacksAsText(logging.Filter):
    """A record's traceback kept as text, not as frames: vLLM logs the chat-template warm-up's
    failure (no tokenizer) with exc_info from inside `LLM.__init__`, and pytest's log capture
    keeps the records until the test ends, so the frames would keep every engine alive."""

    def filter(self, record):
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return True


@pytest.fixture(scope="module", autouse=True)
def engines_released_with_their_logs():
    logger, keep_text = logging.getLogger("vllm.renderers.base"), TracebacksAsText()
    logger.addFilter(keep_text)
    yield
    logger.removeFilter(keep_text)


def check_memory() -> None:
    """After an engine is dropped its memory comes back (one leaked KV cache is 1 GiB)."""
    gc.collect()
    rss = psutil.Process().memory_info().rss
    if not _rss_baseline:
        _rss_baseline.append(rss)
    assert rss - _rss_baseline[0] < RSS_GROWTH_LIMIT, f"RSS grew {(rss - _rss_baseline[0]) / 2**20:.0f} MiB"


def run_case(family: str, folder: Path, k: int, max_model_len: int, broken, prompts_of, tokens: int, logits: int):
    try:
        llm = start_engine(folder, k, max_model_len)
    except Exception as e:  # noqa: BLE001 -- a refusal may come as any exception type; its message matters
        gc.collect()
        check_refusal(family, e, broken)
        return
    try:
        assert not broken, f"a {family} folder that breaks {[what for what, _ in broken]} started"
        serve_and_check(llm, family, prompts_of(), tokens, logits)
    finally:
        del llm
        check_memory()


def write_config(path: Path, case, changes: dict) -> Path:
    """Edit the built folder's config.json: `changes` merged one level deep, and the case's SJD++
    defaults (row_width, init, fresh_token_range) under "sjdpp" where it has any."""
    file = path / "config.json"
    config = json.loads(file.read_text())
    for key, value in changes.items():
        config[key] = {**config[key], **value} if isinstance(config.get(key), dict) else value
    sjdpp = {"row_width": case.row_width, "init": case.init, "fresh_token_range": case.fresh_range}
    sjdpp = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sjdpp.items() if v is not None}
    if sjdpp:
        config["sjdpp"] = sjdpp
    file.write_text(json.dumps(config))
    return path


# Janus -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JanusCase:
    text_vocab: int
    codes: int
    grid: int
    special_ids: tuple[int, ...]  # in SPECIAL_NAMES order, distinct, < text_vocab (the tokenizer's)
    spread_words: bool = False  # prompt words at ids spread over the vocabulary (past the codes too)
    outside: tuple[str, ...] = ()  # RULE_KEYS set to text_vocab (one past) in generation_config.json
    boi_top_level: bool = False  # boi_token_id at the top level (the conversion script's form)
    num_image_tokens: int | None = None  # vision_config.num_image_tokens; None: grid ** 2
    row_width: int | None = None  # config.json "sjdpp"; None: the family's (grid)
    init: str | None = None
    fresh_range: tuple[int, int] | None = None
    k: int = 6

    @property
    def tokens(self) -> int:
        return self.grid**2 if self.num_image_tokens is None else self.num_image_tokens

    def broken(self) -> list[tuple[str, set[str]]]:
        """What the folder contradicts, each with the keys a refusal may name."""
        broken = []
        if self.codes > self.text_vocab:
            broken.append(("codes past the text vocabulary", {"num_embeddings", "vocab_size"}))
        if self.tokens != self.grid**2:
            broken.append(("grid mismatch", {"num_image_tokens", "num_patches"}))
        for key in self.outside:
            broken.append((f"{key} past the vocabulary", {key, "vocab_size"}))
        if self.row_width is not None and self.row_width > min(self.tokens, JANUS_MAX_MODEL_LEN):
            broken.append(("row past the image", {"row_width"}))
        if self.fresh_range is not None and self.fresh_range[1] > self.codes:
            broken.append(("fresh range past the codes", {"fresh_token_range"}))
        return broken

    def build(self, path: Path) -> Path:
        ids = dict(zip(SPECIAL_NAMES, self.special_ids))
        shape = JanusShape(
            text_vocab=self.text_vocab, codes=self.codes, grid=self.grid, image_size=self.grid * 8,
            special_ids=ids, max_position_embeddings=128, spread_words=self.spread_words,
        )
        generation = {key: self.text_vocab for key in self.outside if key != "boi_token_id"}
        boi = self.text_vocab if "boi_token_id" in self.outside else ids["boi"]
        if self.boi_top_level:
            generation.update(generation_kwargs=None, boi_token_id=boi)
        else:
            generation["generation_kwargs"] = {"boi_token_id": boi}
        build_tiny_janus(path, shape, generation_overrides=generation)
        return write_config(path, self, {"vision_config": {"num_image_tokens": self.tokens}})


@st.composite
def janus_cases(draw) -> JanusCase:
    codes = draw(st.integers(16, 64))
    relation = draw(st.sampled_from([">", "==", ">", "<", ">"]))
    text_vocab = {
        "<": lambda: draw(st.integers(12, codes - 1)), "==": lambda: codes, ">": lambda: draw(st.integers(codes + 1, 400)),
    }[relation]()
    n = len(SPECIAL_NAMES)
    special = draw(st.lists(st.integers(0, text_vocab - 1), min_size=n, max_size=n, unique=True))
    grid = draw(st.integers(2, 4))
    tokens = draw(mostly(st.just(grid**2), st.sampled_from([grid**2 - 1, grid**2 + 1, grid * (grid + 1)]), one_in=6))
    row_width = draw(mostly(st.none() | st.integers(1, tokens), st.integers(tokens + 1, tokens + 3), one_in=6))
    fresh_hi = draw(mostly(st.none(), st.sampled_from([codes, codes + 1]), one_in=6))
    return JanusCase(
        text_vocab=text_vocab, codes=codes, grid=grid, special_ids=tuple(special), spread_words=draw(st.booleans()),
        outside=tuple(draw(mostly(st.just([]), st.lists(st.sampled_from(RULE_KEYS), min_size=1, unique=True), one_in=6))),
        boi_top_level=draw(st.booleans()), num_image_tokens=tokens, row_width=row_width,
        init=draw(st.sampled_from([None, None, "above", "left", "random"])),
        fresh_range=None if fresh_hi is None else (0, fresh_hi), k=draw(st.integers(4, 8)),
    )


def janus_events(case: JanusCase) -> None:
    relation = "<" if case.text_vocab < case.codes else "==" if case.text_vocab == case.codes else ">"
    event(f"janus: text vocab {relation} codes")
    if case.outside:
        event("janus: special id past the vocabulary")
    if case.tokens != case.grid**2:
        event("janus: grid mismatch")
    if case.row_width is not None and case.row_width > case.tokens:
        event("janus: row width past the image")
    if max(case.special_ids) >= case.codes:
        event("janus: special ids past the codes")
    if not case.broken():
        event("janus: sound folder")


HIGH = lambda n: tuple(range(n - 1, n - 10, -1))  # noqa: E731 -- the nine specials at the top of a vocabulary


@settings(max_examples=18, **SETTINGS)
@given(case=janus_cases())
# Sound: the specials (BOS and <begin_of_image> in every prompt) past the codes, words spread.
@example(case=JanusCase(text_vocab=100, codes=24, grid=3, special_ids=HIGH(100), spread_words=True, k=8))
# Text vocabulary == codes, a row as wide as the image (no row above: random), init above.
@example(case=JanusCase(text_vocab=32, codes=32, grid=3, special_ids=HIGH(32), row_width=9, init="above", k=4))
# Rows of one token, a 2x2 image; BOI at the top level of generation_config.json.
@example(case=JanusCase(text_vocab=40, codes=16, grid=2, special_ids=HIGH(40), row_width=1, boi_top_level=True))
# Broken: codes past the text vocabulary.
@example(case=JanusCase(text_vocab=20, codes=32, grid=2, special_ids=tuple(range(9))))
# Broken: special ids one past the vocabulary in generation_config.json.
@example(case=JanusCase(text_vocab=64, codes=32, grid=2, special_ids=HIGH(64), outside=("pad_token_id",)))
@example(case=JanusCase(text_vocab=64, codes=32, grid=2, special_ids=HIGH(64), outside=("boi_token_id",), boi_top_level=True))
@example(case=JanusCase(text_vocab=64, codes=32, grid=2, special_ids=HIGH(64), outside=("bos_token_id",)))
# Broken: a grid that does not match the image's tokens.
@example(case=JanusCase(text_vocab=64, codes=32, grid=3, special_ids=HIGH(64), num_image_tokens=10))
# Broken: a row past the image; a fresh-token range past the codes.
@example(case=JanusCase(text_vocab=64, codes=32, grid=3, special_ids=HIGH(64), row_width=10))
@example(case=JanusCase(text_vocab=64, codes=32, grid=2, special_ids=HIGH(64), fresh_range=(0, 33)))
def test_janus_folder_serves_or_is_refused_naming_the_key(case, tmp_path_factory):
    from vllm_sjdpp import families

    janus_events(case)
    folder = case.build(tmp_path_factory.mktemp("janus-fuzz"))

    def prompts():
        family = families.load(folder)
        return [family.prompt_ids(text) for text in JANUS_PROMPTS]

    print(f"[folder fuzz] janus {asdict(case)}")
    run_case("janus", folder, case.k, JANUS_MAX_MODEL_LEN, case.broken(), prompts, case.tokens, case.codes)


# Guided Llama ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaCase:
    vocab: int
    pad: int
    keep: tuple[int, ...]
    prompt: tuple[int, ...]
    row_width: int | None = None
    init: str | None = None
    fresh_range: tuple[int, int] | None = None
    k: int = 6

    def broken(self) -> list[tuple[str, set[str]]]:
        broken = []
        if not 0 <= self.pad < self.vocab:
            broken.append(("pad past the vocabulary", {"pad_token_id", "vocab_size"}))
        if any(not 0 <= t < self.vocab for t in self.keep):
            broken.append(("kept id past the vocabulary", {"keep_token_ids", "vocab_size"}))
        if self.row_width is not None and self.row_width > LLAMA_MAX_MODEL_LEN:
            broken.append(("row past the context", {"row_width"}))
        if self.init == "above" and self.row_width is None:
            broken.append(("init above without a row width", {"row_width"}))
        if self.fresh_range is not None and self.fresh_range[1] > self.vocab:
            broken.append(("fresh range past the vocabulary", {"fresh_token_range"}))
        return broken

    def build(self, path: Path) -> Path:
        build_tiny_llama(path, vocab_size=self.vocab, guided=True)
        return write_config(path, self, {"sjdpp_guidance": {"keep_token_ids": list(self.keep), "pad_token_id": self.pad}})


@st.composite
def llama_cases(draw) -> LlamaCase:
    vocab = draw(st.integers(16, 64))
    rule_id = mostly(st.integers(0, vocab - 1), st.sampled_from([vocab, vocab + 1, -1]), one_in=5)
    init = draw(st.sampled_from([None, "above", "above", "left", "random"]))
    width = st.integers(1, LLAMA_MAX_MODEL_LEN)
    row_width = draw(mostly(st.none() | width, st.integers(LLAMA_MAX_MODEL_LEN + 1, LLAMA_MAX_MODEL_LEN + 3)))
    if init == "above" and row_width is None:
        row_width = draw(mostly(width, st.none(), one_in=6))
    lo = draw(st.integers(0, vocab - 1))
    hi = draw(mostly(st.integers(lo + 1, vocab), st.integers(vocab + 1, vocab + 4)))
    return LlamaCase(
        vocab=vocab, pad=draw(rule_id), keep=tuple(draw(st.lists(rule_id, max_size=3, unique=True))),
        prompt=(0, *draw(st.lists(st.integers(0, vocab - 1), min_size=0, max_size=6))), row_width=row_width, init=init,
        fresh_range=draw(st.sampled_from([None, (lo, hi)])), k=draw(st.integers(4, 8)),
    )


def llama_events(case: LlamaCase) -> None:
    if not 0 <= case.pad < case.vocab or any(not 0 <= t < case.vocab for t in case.keep):
        event("llama: rule id past the vocabulary")
    if case.row_width is not None and case.row_width > LLAMA_MAX_MODEL_LEN:
        event("llama: row width past max_model_len")
    elif case.row_width is not None and case.row_width > LLAMA_TOKENS:
        event("llama: row width past the generated tokens")
    if case.fresh_range is not None and case.fresh_range[1] > case.vocab:
        event("llama: fresh range past the vocabulary")
    if not case.broken():
        event("llama: sound folder")


@settings(max_examples=14, **SETTINGS)
@given(case=llama_cases())
# Sound: rows above drafted from generated tokens, fresh tokens the whole vocabulary.
@example(case=LlamaCase(vocab=48, pad=47, keep=(0,), prompt=(0, 5, 9, 3, 40), row_width=4, init="above", fresh_range=(0, 48)))
# Sound: a row as wide as the context (the row above is in the prompt: random fresh tokens).
@example(case=LlamaCase(vocab=16, pad=15, keep=(0, 3), prompt=(0, 15, 14), row_width=LLAMA_MAX_MODEL_LEN, init="above", k=8))
# Broken: rule ids past the vocabulary.
@example(case=LlamaCase(vocab=32, pad=32, keep=(0,), prompt=(0, 1)))
@example(case=LlamaCase(vocab=32, pad=31, keep=(0, 33), prompt=(0, 1)))
# Broken: a row past the context; init above without a row; fresh tokens past the vocabulary.
@example(case=LlamaCase(vocab=32, pad=31, keep=(0,), prompt=(0, 1), row_width=LLAMA_MAX_MODEL_LEN + 1, init="above"))
@example(case=LlamaCase(vocab=32, pad=31, keep=(0,), prompt=(0, 1), init="above"))
@example(case=LlamaCase(vocab=32, pad=31, keep=(0,), prompt=(0, 1), fresh_range=(4, 33)))
def test_guided_llama_folder_serves_or_is_refused_naming_the_key(case, tmp_path_factory):
    llama_events(case)
    folder = case.build(tmp_path_factory.mktemp("llama-fuzz"))
    second = [0, *reversed(case.prompt[1:])]
    print(f"[folder fuzz] llama {asdict(case)}")
    run_case(
        "guided-llama", folder, case.k, LLAMA_MAX_MODEL_LEN, case.broken(), lambda: [list(case.prompt), second],
        LLAMA_TOKENS, case.vocab,
    )


@pytest.fixture(scope="module", autouse=True)
def outcomes_report():
    """The served and refused folders and the refusals' messages, printed with -s."""
    yield
    for family in ("janus", "guided-llama"):
        mine = [(o, m) for f, o, m in OUTCOMES if f == family]
        served = sum(o == "served" for o, _ in mine)
        print(f"\n[folder fuzz] {family}: {served} served, {len(mine) - served} refused")
        for outcome, message in mine:
            if outcome == "refused":
                print(f"[folder fuzz]   refused: {' | '.join(message.splitlines())[:500]}")
