import pytest

from vllm_sjdpp import SJDPPConfig


def test_defaults():
    c = SJDPPConfig()
    assert (c.num_speculative_tokens, c.reuse, c.init, c.jacobi_start) == (32, "coupled", "random", 0)
    assert c.draft_token_budget == "auto"
    assert c.fresh_vocab(100) == range(100)


@pytest.mark.parametrize(
    "options, option",
    [
        ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"num_speculative_tokens": 65}, "num_speculative_tokens"),
        ({"num_speculative_tokens": 4.0}, "num_speculative_tokens"),
        ({"reuse": "always"}, "reuse"),
        ({"reuse": "confidence", "threshold": 0.0}, "threshold"),
        ({"threshold": 1.5}, "threshold"),
        ({"init": "below"}, "init"),
        ({"init": "above"}, "row_width"),
        ({"init": "above", "row_width": 0}, "row_width"),
        ({"fresh_token_range": [5, 5]}, "fresh_token_range"),
        ({"fresh_token_range": [1, 2, 3]}, "fresh_token_range"),
        ({"fresh_token_ids": []}, "fresh_token_ids"),
        ({"fresh_token_ids": [1, -2]}, "fresh_token_ids"),
        ({"fresh_token_ids": [1], "fresh_token_range": [0, 4]}, "fresh_token_ids"),
        ({"jacobi_start": -1}, "jacobi_start"),
        ({"draft_token_budget": -1}, "draft_token_budget"),
        ({"draft_token_budget": 8.5}, "draft_token_budget"),
        ({"draft_token_budget": "fast"}, "draft_token_budget"),
        ({"exact_seeds": "yes"}, "exact_seeds"),
        ({"window": 4}, "window"),
    ],
)
def test_bad_values_name_the_option(options, option):
    with pytest.raises(ValueError, match=repr(option)):
        SJDPPConfig.from_dict(options)


def test_unknown_option_lists_known_ones():
    with pytest.raises(ValueError, match="known: .*num_speculative_tokens"):
        SJDPPConfig.from_dict({"num_speculative_token": 4})


def test_fresh_vocabulary_forms():
    assert SJDPPConfig(fresh_token_range=[10, 20]).fresh_vocab(100) == range(10, 20)
    assert SJDPPConfig(fresh_token_ids=[7, 3, 3]).fresh_vocab(100) == [3, 7]
    with pytest.raises(ValueError, match="fresh_token_range"):
        SJDPPConfig(fresh_token_range=(10, 200)).fresh_vocab(100)
    with pytest.raises(ValueError, match="fresh_token_ids"):
        SJDPPConfig(fresh_token_ids=[100]).fresh_vocab(100)


def test_request_overrides():
    server = SJDPPConfig(num_speculative_tokens=8, fresh_token_ids=[1, 2])
    c = server.for_request({"sjdpp_reuse": "none", "sjdpp_fresh_token_range": [4, 9], "other": 1})
    assert (c.reuse, c.fresh_token_range, c.fresh_token_ids) == ("none", (4, 9), None)
    assert server.for_request(None) == server
    assert server.for_request({"sjdpp_disable": True}) is None
    assert server.for_request({"sjdpp_num_speculative_tokens": 3}).num_speculative_tokens == 3


@pytest.mark.parametrize(
    "extra, option",
    [
        ({"sjdpp_reuse": "often"}, "sjdpp_reuse"),
        ({"sjdpp_num_speculative_tokens": 9}, "sjdpp_num_speculative_tokens"),
        ({"sjdpp_row_width": -1}, "sjdpp_row_width"),
        ({"sjdpp_init": "above"}, "sjdpp_row_width"),
        ({"sjdpp_disable": "yes"}, "sjdpp_disable"),
        ({"sjdpp_windw": 3}, "sjdpp_windw"),
        ({"sjdpp_draft_token_budget": 3}, "sjdpp_draft_token_budget"),  # server-wide only
        ({"sjdpp_exact_seeds": True}, "sjdpp_exact_seeds"),  # server-wide only
    ],
)
def test_bad_request_overrides_name_the_key(extra, option):
    with pytest.raises(ValueError, match=option):
        SJDPPConfig(num_speculative_tokens=8).for_request(extra)
