"""Guidance options, the unconditional rule and the row index that rides with hidden states."""

from __future__ import annotations

import pytest
import torch

from vllm_sjdpp.families.rule import UnconditionalRule
from vllm_sjdpp.guidance.cfg import MAX_BATCH_TOKENS, GuidanceBatch, ServedGuidance, combine, request_guidance, served_rule

RULE = UnconditionalRule(frozenset({0, 9}), pad_token_id=7)
PROMPT = [0, 3, 4, 9]


def test_rule_keeps_length_and_kept_tokens():
    assert RULE.apply(PROMPT) == [0, 7, 7, 9]
    assert UnconditionalRule.from_config({"keep_token_ids": [0, 9], "pad_token_id": 7}) == RULE
    with pytest.raises(ValueError, match="sjdpp_guidance"):
        UnconditionalRule.from_config({"pad_token_id": 7})


def test_request_defaults_and_overrides():
    assert request_guidance(None, PROMPT, RULE, 2.5, 10) == (2.5, [0, 7, 7, 9])
    assert request_guidance({"guidance_scale": 0}, PROMPT, RULE, 2.5, 10) == (0.0, [0, 7, 7, 9])
    negative = [0, 1, 1, 9]
    assert request_guidance({"negative_prompt_token_ids": negative}, PROMPT, RULE, 1.0, 10) == (1.0, negative)
    assert request_guidance({}, PROMPT, None, 1.0, 10) is None  # an unguided model
    for other_length in ([0, 1, 9], [0, 1, 1, 1, 9]):  # runs paired (guidance.pairing)
        assert request_guidance({"negative_prompt_token_ids": other_length}, PROMPT, RULE, 1.0, 10) == (1.0, other_length)


@pytest.mark.parametrize(
    "args, match",
    [
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"guidance_scale": "3"}, "guidance_scale"),
        ({"guidance_scale": True}, "guidance_scale"),
        ({"negative_prompt_token_ids": []}, "at least one token id"),
        ({"negative_prompt_token_ids": [0, 1, 1, 10]}, r"\[0, 10\)"),  # past the vocabulary
        ({"negative_prompt_token_ids": [0, 1, -1, 9]}, "negative_prompt_token_ids"),
        ({"negative_prompt_token_ids": "0 1 1 9"}, "negative_prompt_token_ids"),
    ],
)
def test_bad_options_name_themselves(args, match):
    with pytest.raises(ValueError, match=match):
        request_guidance(args, PROMPT, RULE, 1.0, 10)


def test_guidance_on_unguided_model_is_refused():
    with pytest.raises(ValueError, match="not served with guidance"):
        request_guidance({"guidance_scale": 3.0}, PROMPT, None, 1.0, 10)


def every_row_finds_its_scale(dtype) -> bool:
    """A full batch's index columns in the model dtype, gathered in any order (as vLLM gathers
    rows for sampling and logprobs): does `row_scales` give each row its own token's scale?"""
    batch = GuidanceBatch(ServedGuidance(RULE, 1.0, 10), MAX_BATCH_TOKENS, "cpu")
    batch.token_scale.copy_(torch.arange(MAX_BATCH_TOKENS, dtype=torch.float32))  # scale t at token t
    index = GuidanceBatch.index_columns(MAX_BATCH_TOKENS, dtype, "cpu")
    rows = torch.randperm(MAX_BATCH_TOKENS, generator=torch.Generator().manual_seed(0))
    return torch.equal(batch.row_scales(index[rows]), rows.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_row_index_survives_the_model_dtype(dtype):
    assert every_row_finds_its_scale(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_row_index_in_one_column_is_caught(dtype, monkeypatch):
    """Broken variant: our index_columns and row_scales with base 65536, i.e. the index as one
    number (high digit 0): bf16 and fp16 round it past 256 and 2048, and the check above must
    then fail.  (float32 holds it exactly: there the base is not what keeps the index.)"""
    from vllm_sjdpp.guidance import cfg

    monkeypatch.setattr(cfg, "INDEX_BASE", MAX_BATCH_TOKENS)
    index = GuidanceBatch.index_columns(MAX_BATCH_TOKENS, torch.float32, "cpu")
    assert not index[:, 0].any()  # one column: the index itself
    assert not every_row_finds_its_scale(dtype)


def test_combine_is_the_guidance_formula():
    cond, uncond = torch.randn(3, 11), torch.randn(3, 11)
    scale = torch.tensor([0.0, 1.0, 3.0])
    out = combine(cond, uncond, scale)
    torch.testing.assert_close(out[0], uncond[0])
    torch.testing.assert_close(out[1], cond[1])
    torch.testing.assert_close(out[2], uncond[2] + 3 * (cond[2] - uncond[2]))


def _model_config(guidance):
    from types import SimpleNamespace

    text = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, hidden_size=128)
    hf = SimpleNamespace(sjdpp_guidance=guidance) if guidance is not None else SimpleNamespace()
    config = SimpleNamespace(hf_text_config=text, hf_config=hf, model_arch_config=None)
    config.try_get_generation_config = dict
    config.get_model_arch_config = lambda: (text.num_attention_heads, text.num_key_value_heads, text.head_dim)
    return config


def test_config_hook_doubles_heads_once():
    from vllm_sjdpp.guidance.llama import guided_llama_config_hook

    config = _model_config({"keep_token_ids": [0], "pad_token_id": 7})
    guided_llama_config_hook(config)
    guided_llama_config_hook(config)  # the worker's copy arrives doubled already
    assert config.model_arch_config == (8, 4, 32)  # head_dim kept from before the doubling
    assert served_rule(config) == UnconditionalRule(frozenset({0}), 7)
    with pytest.raises(ValueError, match="sjdpp_guidance"):
        guided_llama_config_hook(_model_config(None))  # a guided architecture without its rule


def test_config_hook_keeps_the_heads_in_the_paired_layout():
    """One branch per sequence: the checkpoint's heads, marked as guided, in the layout asked."""
    from vllm_sjdpp.guidance.cfg import LAYOUT_ATTR, ServedGuidance
    from vllm_sjdpp.guidance.llama import guided_llama_config_hook

    config = _model_config({"keep_token_ids": [0], "pad_token_id": 7})
    config.hf_config.sjdpp_guidance_layout = "paired"
    config.get_vocab_size = lambda: 48
    guided_llama_config_hook(config)
    assert config.model_arch_config is None  # nothing doubled: vLLM's own view stands
    assert (config.hf_text_config.num_attention_heads, config.hf_text_config.num_key_value_heads) == (4, 2)
    assert getattr(config.hf_text_config, LAYOUT_ATTR) == "paired"
    assert ServedGuidance.of(config) == ServedGuidance(UnconditionalRule(frozenset({0}), 7), 1.0, 48, one_branch=True)
    bad = _model_config({"keep_token_ids": [0], "pad_token_id": 7})
    bad.hf_config.sjdpp_guidance_layout = "both"
    with pytest.raises(ValueError, match="'sjdpp_guidance_layout': got 'both'"):
        guided_llama_config_hook(bad)


@pytest.mark.parametrize("one_branch, scale, negative, paired", [
    (False, 3.0, [0, 7, 7], False),  # the prompt's length: its own sequence's second branch
    (False, 3.0, [0, 7], True),  # another length: a sequence of its own
    (False, 1.0, [0, 7], True),
    (True, 3.0, [0, 7, 7], True),  # one branch per sequence: every guided request pairs
    (True, 0.0, [0, 7], True),  # the unconditional model alone still needs its context
    (True, 1.0, [0, 7], False),  # the conditional model alone
])
def test_which_requests_pair(one_branch, scale, negative, paired):
    served = ServedGuidance(RULE, 3.0, 10, one_branch)
    args = {"guidance_scale": scale, "negative_prompt_token_ids": negative}
    assert (served.companion_prompt(args, [0, 5, 6]) == negative) is paired
    assert served.companion_prompt(args, [0, 5, 6]) in (None, negative)


@pytest.mark.parametrize("rule, message", [
    ({"keep_token_ids": [0], "pad_token_id": 48}, r"'sjdpp_guidance' 'pad_token_id': \[48\] outside the text vocabulary \(vocab_size=48\)"),
    ({"keep_token_ids": [0, -1], "pad_token_id": 7}, r"'keep_token_ids': \[-1\] outside"),
])
def test_config_hook_refuses_rule_ids_the_model_cannot_embed(rule, message):
    """The uncond branch feeds the rule's ids to the embedding: an id past the vocabulary would
    raise in the first guided forward, so the folder is refused at start-up."""
    from vllm_sjdpp.guidance.llama import guided_llama_config_hook

    config = _model_config(rule)
    config.hf_config.vocab_size = 48
    with pytest.raises(ValueError, match=message):
        guided_llama_config_hook(config)
    config.hf_config.sjdpp_guidance = {"keep_token_ids": [0], "pad_token_id": 47}
    guided_llama_config_hook(config)  # the same folder with ids inside passes
    assert served_rule(_model_config({"keep_token_ids": [0], "pad_token_id": 7})) is None  # not doubled: unguided


@pytest.mark.parametrize(
    "args, flag",
    [(dict(enable_dbo=True), "--enable-dbo"), (dict(pipeline_parallel_size=2), "--pipeline-parallel-size 2"),
     (dict(tensor_parallel_size=2), "--tensor-parallel-size 2")],
)
def test_parallel_modes_guidance_cannot_run_are_refused_at_start_up(tiny_guided_path, args, flag):
    """What vLLM builds at start-up (`EngineArgs.create_engine_config`) refuses them, naming the
    flag; the tiny guided Llama has one KV head per branch, so two tensor-parallel ranks are one
    too many.  Without the flag the same folder starts."""
    from vllm.engine.arg_utils import EngineArgs

    with pytest.raises(ValueError, match=flag):
        EngineArgs(model=tiny_guided_path, skip_tokenizer_init=True, max_model_len=128, **args).create_engine_config()
    EngineArgs(model=tiny_guided_path, skip_tokenizer_init=True, max_model_len=128).create_engine_config()


def test_async_speculation_is_refused_when_the_runner_starts(tiny_guided_path):
    """vLLM counts drafts as computed before verifying them under asynchronous scheduling with
    speculative decoding; the guidance inputs read those counts.  The check the runner patch runs,
    on vLLM's config: refused with both, accepted with either alone."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_sjdpp.guidance.llama import check_async_speculation

    config = EngineArgs(model=tiny_guided_path, skip_tokenizer_init=True, max_model_len=128).create_engine_config()
    config.scheduler_config.async_scheduling = True
    check_async_speculation(config)  # no speculation
    config.speculative_config = object()
    with pytest.raises(ValueError, match="--async-scheduling with speculative decoding"):
        check_async_speculation(config)
    config.scheduler_config.async_scheduling = False
    check_async_speculation(config)
