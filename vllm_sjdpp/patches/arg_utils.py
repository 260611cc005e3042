"""Patches of vllm/engine/arg_utils.py: `--speculative-config sjdpp`.

`EngineArgs.add_cli_args` parses that flag with json.loads, and `SpeculativeConfig` only knows
its own methods and fields.  Both the bare word and `{"method": "sjdpp", <SJD++ options>}`
become vLLM's model-free hook (method="custom_class", model=PROPOSER_PATH); the SJD++ options,
with the model folder's defaults, travel to every process in `VllmConfig.additional_config
["sjdpp"]`, checked against the model at start-up.

`EngineArgs.create_model_config` also names, where it fails on a checkpoint in a layout no
family reads (deepseek-ai's Janus release: transformers' "upgrade Transformers"), the folder to
use instead (`families.foreign_format`).
"""

from __future__ import annotations

import functools

import argparse
import dataclasses
import json
import re
from typing import Any, Callable

from ..config import ADDITIONAL_CONFIG_KEY, SJDPPConfig

METHOD = "sjdpp"
PROPOSER_PATH = "vllm_sjdpp.engine.proposer.SJDPPProposer"


def parse_speculative_config(value: str) -> dict[str, Any]:
    """--speculative-config: JSON as vLLM takes it, or a bare method name such as `sjdpp`."""
    text = value.strip()
    if re.fullmatch(r"[A-Za-z_][\w-]*", text):
        return {"method": text}
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--speculative-config: not JSON nor a method name: {e}")
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("--speculative-config must be a JSON object or a method name")
    return parsed


def model_defaults(model_config: Any) -> dict[str, Any]:
    """SJD++ defaults of a model folder: what its family implies (a Janus folder's image-code
    range and grid) and what its config.json records under "sjdpp"; options given to the server
    take precedence."""
    from ..families import family_of

    hf_config = getattr(model_config, "hf_config", None)
    return family_of(hf_config).sjdpp_defaults(hf_config)


def model_limits(model_config: Any) -> tuple[int, int, int | None]:
    """What bounds SJD++ options on this model (`SJDPPConfig.check_model`): the logits per
    position, the context length and the tokens of one image (None: no images)."""
    from ..families import family_of, logits_size

    hf_config = model_config.hf_config
    return logits_size(model_config), model_config.max_model_len, family_of(hf_config).image_tokens(hf_config)


def sjdpp_speculative_config(
    spec: dict[str, Any], defaults: dict[str, Any] | None = None, limits: tuple[int, int, int | None] | None = None
) -> tuple[dict[str, Any], dict[str, Any], SJDPPConfig]:
    """{"method": "sjdpp", ...} -> (vLLM's custom_class config, the SJD++ options, validated,
    against the model's `limits` too where given).  An invalid option that the server was not
    given comes from the model folder, and the error says so."""
    from vllm.config import SpeculativeConfig

    ours = {f.name for f in dataclasses.fields(SJDPPConfig)}
    theirs = {f.name for f in dataclasses.fields(SpeculativeConfig)}
    options = {k: v for k, v in spec.items() if k in ours}
    if defaults:
        unknown = sorted(set(defaults) - ours)
        if unknown:
            raise ValueError(f"unknown SJD++ option(s) {unknown} in the model's config.json 'sjdpp'")
        if "fresh_token_range" in options or "fresh_token_ids" in options:
            defaults = {k: v for k, v in defaults.items() if not k.startswith("fresh_token_")}
        options = {**defaults, **options}
    rest = {k: v for k, v in spec.items() if k not in ours and k != "method"}
    unknown = sorted(k for k in rest if k not in theirs)
    if unknown:
        raise ValueError(
            f"unknown SJD++ option(s) {', '.join(map(repr, unknown))} in --speculative-config; "
            f"SJD++ options: {', '.join(sorted(ours))}"
        )
    if rest.get("model") not in (None, PROPOSER_PATH):
        raise ValueError(f"--speculative-config: method {METHOD!r} takes no draft model")
    try:
        config = SJDPPConfig.from_dict(options)
        if limits is not None:
            config.check_model(*limits)
    except ValueError as e:
        option = re.match(r"SJD\+\+ option '(\w+)'", str(e))
        if option and option.group(1) in (defaults or {}) and option.group(1) not in spec:
            raise ValueError(f"{e} (the model folder's default: its family's, or config.json 'sjdpp')") from None
        raise
    vllm_spec = {
        **rest,
        "method": "custom_class",
        "model": PROPOSER_PATH,
        "num_speculative_tokens": config.num_speculative_tokens,
    }
    return vllm_spec, options, config


def exact_seeds_dtype(dtype: Any, on_cpu: bool) -> Any:
    """--dtype under the SJD++ option exact_seeds: float32 on a CPU for "auto" (a float32 pass
    rounds a position's logits the same in any pass shape on the CPUs measured; bf16 emulated on
    AVX2 does not); another dtype there is refused.  Elsewhere unchanged."""
    if not on_cpu:
        return dtype
    name = str(dtype).removeprefix("torch.").lower()
    if name in ("auto", "float32", "float"):
        return "float32"
    raise ValueError(
        f"SJD++ option 'exact_seeds': on a CPU a seed names one image in float32; --dtype {dtype} was given"
    )


def use_batch_invariant_kernels(environ: dict) -> None:
    """exact_seeds on a GPU: vLLM's batch-invariant mode, in this process's environment (the
    engine processes inherit it); refused if the user turned it off."""
    if environ.get("VLLM_BATCH_INVARIANT", "1") == "0":
        raise ValueError("SJD++ option 'exact_seeds' needs VLLM_BATCH_INVARIANT=1 on a GPU; it is set to 0")
    environ["VLLM_BATCH_INVARIANT"] = "1"


def foreign_format_of(model: str, revision: str | None = None) -> str | None:
    """Why the model folder (or cached hub id) is a checkpoint layout no family reads; None when
    it is not, or cannot be found."""
    from .. import families

    try:
        return families.foreign_format(families.resolve(model, revision))
    except (OSError, ValueError):
        return None


def is_sjdpp(speculative_config: Any) -> bool:
    return (
        speculative_config is not None
        and getattr(speculative_config, "method", None) == "custom_class"
        and getattr(speculative_config, "model", None) == PROPOSER_PATH
    )


def apply(refuse_sjdpp: Callable[[], None] | None = None) -> None:
    """`refuse_sjdpp`: called instead of building SJD++'s config (it raises, naming why), on a
    vLLM the plugin cannot patch."""
    # vllm/engine/arg_utils.py: EngineArgs.add_cli_args (staticmethod, looked up by attribute
    # from AsyncEngineArgs.add_cli_args after plugins load) and create_speculative_config.
    from vllm.engine.arg_utils import EngineArgs

    add_cli_args = EngineArgs.add_cli_args

    @functools.wraps(add_cli_args)
    def add_cli_args_accepting_method_names(parser, *args, **kwargs):
        parser = add_cli_args(parser, *args, **kwargs)
        for action in parser._actions:
            if "--speculative-config" in action.option_strings:
                action.type = parse_speculative_config
        return parser

    EngineArgs.add_cli_args = staticmethod(add_cli_args_accepting_method_names)

    create_speculative_config = EngineArgs.create_speculative_config

    @functools.wraps(create_speculative_config)
    def create_sjdpp_speculative_config(self, target_model_config, target_parallel_config):
        spec = self.speculative_config
        if isinstance(spec, str):
            spec = self.speculative_config = parse_speculative_config(spec)
        if isinstance(spec, dict) and spec.get("method") == METHOD:
            if refuse_sjdpp is not None:
                refuse_sjdpp()
            limits = model_limits(target_model_config)
            vllm_spec, options, _ = sjdpp_speculative_config(spec, model_defaults(target_model_config), limits)
            if getattr(self, "per_request_spec_decode_metrics", None) == "none":
                # Each output then carries its accepted drafts: forward passes per image, exactly.
                self.per_request_spec_decode_metrics = "summary"
            self.additional_config = {**(self.additional_config or {}), ADDITIONAL_CONFIG_KEY: options}
            self.speculative_config = vllm_spec
        return create_speculative_config(self, target_model_config, target_parallel_config)

    EngineArgs.create_speculative_config = create_sjdpp_speculative_config

    create_model_config = EngineArgs.create_model_config

    @functools.wraps(create_model_config)
    def create_model_config_naming_foreign_formats(self):
        try:
            return create_model_config_for_exact_seeds(self)
        except Exception as e:
            # vLLM's own failure on a known checkpoint in its original layout is transformers'
            # "upgrade Transformers"; the folder's config.json names the real cause.
            why = foreign_format_of(self.model, getattr(self, "revision", None))
            if why:
                raise ValueError(f"{self.model}: {why}") from e
            raise

    def create_model_config_for_exact_seeds(self):
        # Before the model config is built: exact_seeds chooses the dtype (and, on a GPU, the
        # kernels) that the seed promise needs.
        spec = self.speculative_config
        if isinstance(spec, str):
            spec = self.speculative_config = parse_speculative_config(spec)
        if isinstance(spec, dict) and spec.get("method") == METHOD and spec.get("exact_seeds") is True:
            import os

            from vllm.platforms import current_platform

            self.dtype = exact_seeds_dtype(self.dtype, current_platform.is_cpu())
            if current_platform.is_cuda():
                use_batch_invariant_kernels(os.environ)
        return create_model_config(self)

    EngineArgs.create_model_config = create_model_config_naming_foreign_formats
