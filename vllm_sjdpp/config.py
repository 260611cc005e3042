"""SJD++ options, validated once so that every later stage can trust them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

REUSE_MODES = ("none", "coupled", "confidence")
VERIFICATIONS = ("gumbel", "ratio")
ADDITIONAL_CONFIG_KEY = "sjdpp"  # where the server's SJD++ options travel inside VllmConfig
# Per-request options: SamplingParams.extra_args (OpenAI: vllm_xargs) keys, each "sjdpp_" + a
# field name, plus sjdpp_disable (decode this request plainly).
REQUEST_PREFIX = "sjdpp_"
REQUEST_FIELDS = (
    "num_speculative_tokens", "verification", "reuse", "threshold", "init", "row_width",
    "fresh_token_range", "fresh_token_ids", "jacobi_start",
)
INIT_MODES = ("random", "left", "above")
MAX_WINDOW = 64
# In a guidance companion's SamplingParams.extra_args (guidance.pairing): the request whose
# drafts it runs and whose tokens it takes; the engine leaves companions out of its statistics.
COMPANION_OF_KEY = "guidance_companion_of"
# The workers' method that runs and reports the start-up seed probe (engine.seed_probe), named
# here for the engine's patches and the images endpoint alike (vLLM's collective_rpc).
SEED_PROBE_METHOD = "sjdpp_seed_probe"
AUTO = "auto"  # draft_token_budget chosen by the goodput controller (goodput.py)
# vLLM's plugin names of this package (setup.py's entry points): the engine side and the images
# endpoint; serving images takes both in VLLM_PLUGINS, which vLLM matches exactly.
ENGINE_PLUGIN, ENDPOINT_PLUGIN = "sjdpp", "sjdpp_images"
PLUGINS_FIX = f"VLLM_PLUGINS={ENGINE_PLUGIN},{ENDPOINT_PLUGIN}"
IMAGES_ROUTE = "/v1/images/generations"  # the endpoint's route (OpenAI's Images API)
# Where windows cannot adapt (several workers must agree on every window), "auto" is this
# fixed budget: the best fixed budget of the CPU sweep at 32-64 requests without guidance.
AUTO_FALLBACK_BUDGET = 512


def _invalid(option: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"SJD++ option {option!r}: got {value!r}; allowed: {allowed}")


def _prefixed(error: ValueError, prefix: str) -> ValueError:
    """`error` naming its option as a request names it (e.g. sjdpp_row_width)."""
    return ValueError(str(error).replace("SJD++ option '", f"SJD++ option '{prefix}", 1))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SJDPPConfig:
    """Server-wide SJD++ options.

    num_speculative_tokens: window length k, the number of draft tokens per forward pass.
    verification: how drafts are verified (kernels/step.py has the math).  "gumbel": a draft is
        accepted iff it wins the exponential race of the target distribution against the
        request's noise, keyed by its seed (a random key if it has none) and the token's
        position; the tokens are then plain decoding's tokens for that seed, token for token,
        at any window and load, and old drafts are reused whenever they stay the winner.
        "ratio": speculative sampling's test, min(1, p/q), with `reuse` below; exact in law, but
        a seed's tokens differ from plain decoding's, and a seeded request keeps its full window.
    reuse: under verification="ratio", what happens to an unaccepted old draft when the window
        is redrafted:
        "none" (plain SJD: resample from the new p), "coupled" (SJD++: keep it with probability
        min(1, p/q), else draw from the residual), "confidence" (keep it when p(d) >= threshold,
        recording a one-hot proposal).
    threshold: the confidence level for reuse="confidence", in (0, 1].
    init: how fresh tokens at the end of the window are chosen: "random" over the fresh-token
        vocabulary, "left" (repeat the previous token) or "above" (the token one image row up).
    row_width: tokens per image row in the generated stream (end-of-row tokens included);
        needed by init="above".
    fresh_token_range: [lo, hi) token ids that fresh tokens are drawn from (image tokens).
    fresh_token_ids: an explicit list instead of a range. Neither given: the whole vocabulary.
    jacobi_start: generated tokens decoded one at a time before drafting starts.
    draft_token_budget: "auto" (the default): each pass gets the drafts that maximise the
        expected committed tokens per second, from the pass cost and acceptance the engine
        measures (`goodput`). A number: the most draft tokens in one pass over all requests,
        windows shrinking evenly as the batch grows (`window_budget`). None: every request
        drafts its k. Server-wide only.
    exact_seeds: make a seed name one image with SJD++ on or off wherever vLLM can: float32 on
        a CPU (`--dtype auto` becomes float32; another --dtype is refused), vLLM's batch-invariant
        kernels on a GPU (VLLM_BATCH_INVARIANT=1); and the server does not start unless its seed
        probe finds a position's logits bit-identical in narrow and wide passes. Server-wide only.
    step_memory_gib: the memory the SJD++ step may hold for its rows (a row over the vocabulary
        per window position), kept out of the KV cache; at large vocabularies it caps the drafts
        of one pass (`engine.step_memory`: Emu3 at 256 sequences, 60 drafts), down to none (then
        the reserve is one row per request, and the server warns). Server-wide only.
    """

    num_speculative_tokens: int = 32
    verification: str = "gumbel"
    reuse: str = "coupled"
    threshold: float = 0.5
    init: str = "random"
    row_width: int | None = None
    fresh_token_range: tuple[int, int] | None = None
    fresh_token_ids: tuple[int, ...] | None = None
    jacobi_start: int = 0
    draft_token_budget: int | str | None = AUTO
    exact_seeds: bool = False
    step_memory_gib: float = 2.0

    def __post_init__(self) -> None:
        k = self.num_speculative_tokens
        if not _is_int(k) or not 1 <= k <= MAX_WINDOW:
            raise _invalid("num_speculative_tokens", k, f"an integer from 1 to {MAX_WINDOW}")
        if self.verification not in VERIFICATIONS:
            raise _invalid("verification", self.verification, " | ".join(VERIFICATIONS))
        if self.reuse not in REUSE_MODES:
            raise _invalid("reuse", self.reuse, " | ".join(REUSE_MODES))
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t <= 1.0:
            raise _invalid("threshold", t, "a number in (0, 1]")
        if self.init not in INIT_MODES:
            raise _invalid("init", self.init, " | ".join(INIT_MODES))
        if self.row_width is not None and (not _is_int(self.row_width) or self.row_width < 1):
            raise _invalid("row_width", self.row_width, "a positive integer")
        if self.init == "above" and self.row_width is None:
            raise _invalid("row_width", None, 'a positive integer (init="above" needs it)')
        if self.fresh_token_range is not None:
            r = self.fresh_token_range
            if (
                not isinstance(r, (tuple, list))
                or len(r) != 2
                or not all(_is_int(x) for x in r)
                or not 0 <= r[0] < r[1]
            ):
                raise _invalid("fresh_token_range", r, "[lo, hi) with 0 <= lo < hi")
            object.__setattr__(self, "fresh_token_range", (int(r[0]), int(r[1])))
        if self.fresh_token_ids is not None:
            ids = self.fresh_token_ids
            if (
                isinstance(ids, (str, bytes))
                or not isinstance(ids, Sequence)
                or len(ids) == 0
                or not all(_is_int(x) and x >= 0 for x in ids)
            ):
                raise _invalid("fresh_token_ids", ids, "a non-empty list of token ids >= 0")
            object.__setattr__(self, "fresh_token_ids", tuple(sorted(set(ids))))
        if self.fresh_token_range is not None and self.fresh_token_ids is not None:
            raise _invalid(
                "fresh_token_ids", self.fresh_token_ids, "not together with fresh_token_range"
            )
        if not _is_int(self.jacobi_start) or self.jacobi_start < 0:
            raise _invalid("jacobi_start", self.jacobi_start, "an integer >= 0")
        if not isinstance(self.exact_seeds, bool):
            raise _invalid("exact_seeds", self.exact_seeds, "true or false")
        m = self.step_memory_gib
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m < float("inf"):
            raise _invalid("step_memory_gib", m, "a number of GiB > 0")
        b = self.draft_token_budget
        if b is not None and b != AUTO and (not _is_int(b) or b < 0):
            raise _invalid("draft_token_budget", b, f'"{AUTO}", null or an integer >= 0')

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> "SJDPPConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"unknown SJD++ option(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(sorted(known))}"
            )
        return cls(**options)

    @classmethod
    def of_server(cls, vllm_config: Any) -> "SJDPPConfig":
        """The server's options, as they travel to every process in
        `VllmConfig.additional_config["sjdpp"]` (the defaults where none are there)."""
        return cls.from_dict((vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY, {}))

    def for_request(self, extra_args: dict[str, Any] | None) -> "SJDPPConfig | None":
        """This server config with a request's overrides applied; None: decode it plainly.

        The window may shrink per request but not grow past the server's k, which sized vLLM.
        """
        ours = {
            key[len(REQUEST_PREFIX):]: value
            for key, value in (extra_args or {}).items()
            if key.startswith(REQUEST_PREFIX)
        }
        disable = ours.pop("disable", False)
        if not isinstance(disable, (bool, int)) or isinstance(disable, float):
            raise _invalid(REQUEST_PREFIX + "disable", disable, "true or false")
        unknown = sorted(set(ours) - set(REQUEST_FIELDS))
        if unknown:
            raise ValueError(
                f"unknown per-request SJD++ option(s) {', '.join(REQUEST_PREFIX + u for u in unknown)}; "
                f"known: {', '.join(REQUEST_PREFIX + f for f in REQUEST_FIELDS + ('disable',))}"
            )
        k = ours.get("num_speculative_tokens", self.num_speculative_tokens)
        if _is_int(k) and k > self.num_speculative_tokens:
            raise _invalid(
                REQUEST_PREFIX + "num_speculative_tokens", k, f"1 to {self.num_speculative_tokens}"
            )
        if "fresh_token_range" in ours:
            ours.setdefault("fresh_token_ids", None)
        if "fresh_token_ids" in ours:
            ours.setdefault("fresh_token_range", None)
        try:
            config = dataclasses.replace(self, **ours)
        except ValueError as e:
            raise _prefixed(e, REQUEST_PREFIX) from None
        return None if disable else config

    def check_model(
        self, vocab_size: int, max_model_len: int, image_tokens: int | None = None, option_prefix: str = ""
    ) -> None:
        """Options that need the model to be checked: fresh tokens inside the vocabulary the model
        samples from, rows no wider than its context, nor than its image (`image_tokens`, the
        generated tokens of one image; None: the model makes no images).  Raises ValueError
        naming the option."""
        try:
            self.fresh_vocab(vocab_size)
        except ValueError as e:
            raise _prefixed(e, option_prefix) from None
        widest, what = min(
            (limit, name) for limit, name in ((max_model_len, "max_model_len"), (image_tokens, "the image's tokens"))
            if limit is not None
        )
        if self.row_width is not None and self.row_width > widest:
            raise _invalid(option_prefix + "row_width", self.row_width, f"a positive integer <= {widest} ({what})")

    def fresh_vocab(self, vocab_size: int) -> list[int] | range:
        """The token ids fresh tokens are drawn from, checked against the model's vocabulary."""
        if self.fresh_token_ids is not None:
            if self.fresh_token_ids[-1] >= vocab_size:
                raise _invalid("fresh_token_ids", self.fresh_token_ids, f"ids < {vocab_size}")
            return list(self.fresh_token_ids)
        if self.fresh_token_range is not None:
            lo, hi = self.fresh_token_range
            if hi > vocab_size:
                raise _invalid("fresh_token_range", self.fresh_token_range, f"hi <= {vocab_size}")
            return range(lo, hi)
        return range(vocab_size)


def plugins_advice(value: str | None) -> str | None:
    """What keeps the images endpoint from being served under `VLLM_PLUGINS=value` (None:
    unset), with the fix; None when nothing does."""
    if value is None:
        return (f"VLLM_PLUGINS is not set, and vLLM loads endpoint plugins only when it names them: "
                f"start the server with {PLUGINS_FIX}")
    names = value.split(",")
    ours = (ENGINE_PLUGIN, ENDPOINT_PLUGIN)
    near = [n for n in names if n not in ours and n.strip().lower() in ours]
    if near:
        return (f"VLLM_PLUGINS={value!r}: vLLM matches plugin names exactly, and {near} matches none; "
                f"write {PLUGINS_FIX} (comma-separated, no spaces)")
    if ENDPOINT_PLUGIN in names and ENGINE_PLUGIN not in names:
        return (f"VLLM_PLUGINS={value!r} names {ENDPOINT_PLUGIN} without {ENGINE_PLUGIN}, the engine side it "
                f"serves with: {PLUGINS_FIX}")
    if ENDPOINT_PLUGIN not in names:
        return f"VLLM_PLUGINS={value!r} does not name {ENDPOINT_PLUGIN}: start the server with {PLUGINS_FIX}"
    return None
