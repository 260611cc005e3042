"""The configuration side of the vLLM patches, without an engine."""

import argparse

import pytest

from vllm_sjdpp import vllm_patches
from vllm_sjdpp.vllm_patches import PROPOSER_PATH, check_version, parse_speculative_config, sjdpp_speculative_config


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.33.1", "0.33.0rc1"])
def test_supported_versions(version):
    check_version(version)


@pytest.mark.parametrize("version", ["0.31.2", "0.34.0", "1.0.0", "dev"])
def test_unsupported_versions_are_refused_clearly(version):
    with pytest.raises(RuntimeError, match=f"supports vLLM 0.32 and 0.33; the installed vLLM is {version}"):
        check_version(version)


def test_installed_vllm_is_supported_and_patched():
    import vllm
    from vllm.plugins import load_general_plugins

    check_version(vllm.__version__)
    load_general_plugins()  # finds our entry point, as every vLLM process does
    assert vllm_patches._applied


def test_speculative_config_accepts_a_method_name_or_json():
    assert parse_speculative_config("sjdpp") == {"method": "sjdpp"}
    assert parse_speculative_config(' {"method": "ngram", "num_speculative_tokens": 3} ') == {
        "method": "ngram", "num_speculative_tokens": 3}
    with pytest.raises(argparse.ArgumentTypeError):
        parse_speculative_config("{not json")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_speculative_config("[1, 2]")


def test_sjdpp_becomes_vllm_custom_class():
    spec, options, config = sjdpp_speculative_config(
        {"method": "sjdpp", "reuse": "none", "num_speculative_tokens": 8, "enforce_eager": True}
    )
    assert spec == {"method": "custom_class", "model": PROPOSER_PATH, "num_speculative_tokens": 8,
                    "enforce_eager": True}
    assert options == {"reuse": "none", "num_speculative_tokens": 8}
    assert (config.reuse, config.num_speculative_tokens) == ("none", 8)
    with pytest.raises(ValueError, match="'reuze'"):
        sjdpp_speculative_config({"method": "sjdpp", "reuze": "none"})
    with pytest.raises(ValueError, match="'init'"):
        sjdpp_speculative_config({"method": "sjdpp", "init": "diagonal"})


def test_model_defaults_yield_to_server_options():
    defaults = {"fresh_token_range": [0, 17], "row_width": 33}
    _, options, config = sjdpp_speculative_config({"method": "sjdpp", "init": "above"}, defaults)
    assert (config.fresh_token_range, config.row_width, config.init) == ((0, 17), 33, "above")
    _, _, config = sjdpp_speculative_config({"method": "sjdpp", "fresh_token_ids": [3], "row_width": 5}, defaults)
    assert (config.fresh_token_range, config.fresh_token_ids, config.row_width) == (None, (3,), 5)
    with pytest.raises(ValueError, match="config.json"):
        sjdpp_speculative_config({"method": "sjdpp"}, {"colour": 1})
