"""The start-up seed probe (engine/seed_probe.py, patches/engine_core.py): an SJD++ engine checks
that a position's logits are bit-identical in one-row passes, full windows and batches, and says
so; a forward that rounds wide passes differently, made on purpose, is caught, in the engine's
verdict and in the images endpoint's responses."""

from __future__ import annotations

import os
import stat
import sys
import textwrap

import pytest
import torch

from openai_images import client_for
from tiny_llama import ENGINE_ENV, SEED_PROBE_ON
from vllm_sjdpp.digits.tokens import GENERATED_LENGTH
from vllm_sjdpp.digits.train import DEFAULT_OUT
from vllm_sjdpp.config import SEED_PROBE_METHOD as WORKER_METHOD

SJDPP = {"method": "sjdpp", "num_speculative_tokens": 8}


def perturb_wide_passes() -> None:
    """The broken variant: the guided Llama's logits of a pass with more than one row moved by
    one float32 ulp, as a kernel that rounds a wide matmul otherwise would."""
    from vllm_sjdpp.guidance.llama import GuidedLlamaForCausalLM

    compute_logits = GuidedLlamaForCausalLM.compute_logits

    def rounded_otherwise(self, hidden_states):
        logits = compute_logits(self, hidden_states)
        if logits is not None and logits.shape[0] > 1:
            logits = torch.nextafter(logits, torch.full_like(logits, float("inf")))
        return logits

    GuidedLlamaForCausalLM.compute_logits = rounded_otherwise


@pytest.fixture(autouse=True)
def seed_probe_on(monkeypatch):
    """The other tests' engines skip the probe (tiny_llama.ENGINE_ENV); these run it."""
    for key, value in SEED_PROBE_ON.items():
        monkeypatch.setenv(key, value)


def verdict_of(llm) -> dict:
    return llm.collective_rpc(WORKER_METHOD, args=("verdict",))[0]


def test_exact_forward_names_one_image(make_engine, tiny_grid_path):
    """float32 on this CPU: every compared row equal, rows compared in full windows and in a batch,
    and the engine serves under "auto" again afterwards."""
    from vllm_sjdpp.engine.runtime import runtime_of

    llm = make_engine(tiny_grid_path, speculative_config=SJDPP)
    verdict = verdict_of(llm)
    assert verdict["identical"] is True
    assert verdict["compared"]["window"] >= 5 and verdict["compared"]["batch"] >= 10
    assert verdict["mode"] == "float32, eager"
    assert runtime_of(llm).config.draft_token_budget == "auto"
    assert not runtime_of(llm).states.requests  # the probe's requests are gone


def test_wide_passes_rounded_otherwise_are_caught(make_engine, tiny_grid_path, monkeypatch, caplog):
    from vllm_sjdpp.guidance.llama import GuidedLlamaForCausalLM

    monkeypatch.setattr(GuidedLlamaForCausalLM, "compute_logits", GuidedLlamaForCausalLM.compute_logits)
    perturb_wide_passes()
    with caplog.at_level("INFO", logger="vllm.sjdpp"):
        llm = make_engine(tiny_grid_path, speculative_config=SJDPP)
    verdict = verdict_of(llm)
    assert verdict["identical"] is False
    assert verdict["differing"]["window"] > 0 and verdict["differing"]["batch"] > 0
    assert any("depend on the shape of the pass" in r.getMessage() for r in caplog.records)


def test_exact_seeds_serves_float32_and_refuses_a_shape_dependent_forward(make_engine, tiny_grid_path, monkeypatch):
    """The switch: exact_seeds turns --dtype auto into float32 on a CPU, and a server whose probe
    finds logits that depend on the pass's shape does not start, naming the option."""
    from vllm_sjdpp.engine.runtime import runtime_of
    from vllm_sjdpp.guidance.llama import GuidedLlamaForCausalLM

    exact = {**SJDPP, "exact_seeds": True}
    llm = make_engine(tiny_grid_path, speculative_config=exact, dtype="auto")
    assert runtime_of(llm).runner.model_config.dtype == torch.float32
    assert verdict_of(llm)["identical"] is True
    del llm
    monkeypatch.setattr(GuidedLlamaForCausalLM, "compute_logits", GuidedLlamaForCausalLM.compute_logits)
    perturb_wide_passes()
    with pytest.raises(Exception, match="exact_seeds"):
        make_engine(tiny_grid_path, speculative_config=exact)
    make_engine(tiny_grid_path, speculative_config=SJDPP)  # without the switch it serves, and says so


def test_exact_seeds_options():
    from vllm_sjdpp.patches.arg_utils import exact_seeds_dtype, use_batch_invariant_kernels

    assert exact_seeds_dtype("auto", on_cpu=True) == "float32"
    assert exact_seeds_dtype(torch.float32, on_cpu=True) == "float32"
    assert exact_seeds_dtype("bfloat16", on_cpu=False) == "bfloat16"
    with pytest.raises(ValueError, match="exact_seeds.*--dtype bfloat16"):
        exact_seeds_dtype("bfloat16", on_cpu=True)
    environ = {}
    use_batch_invariant_kernels(environ)
    assert environ == {"VLLM_BATCH_INVARIANT": "1"}
    with pytest.raises(ValueError, match="VLLM_BATCH_INVARIANT"):
        use_batch_invariant_kernels({"VLLM_BATCH_INVARIANT": "0"})


def test_no_probe_without_sjdpp(make_engine, tiny_grid_path):
    assert verdict_of(make_engine(tiny_grid_path)) is None


@pytest.fixture
def perturbed_cli(tmp_path):
    """`vllm` as a script that breaks the forward first, in its process and in the engine process
(which imports the script as its main module: multiprocessing's spawn)."""
    script = tmp_path / "vllm"
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_seed_probe import perturb_wide_passes
        perturb_wide_passes()
        if __name__ == "__main__":
            from vllm.entrypoints.cli.main import main
            sys.exit(main())
    """))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


@pytest.mark.parametrize("perturbed", [False, True])
def test_images_report_whether_a_seed_names_one_image(tmp_path, monkeypatch, perturbed, request):
    """The images endpoint's `sjdpp.seed_identical`: true on the digit model in float32, false from
    a server whose wide passes round otherwise (and that server's log says so)."""
    from vllm_sjdpp.serving import server

    if perturbed:
        monkeypatch.setattr(server, "VLLM_CLI", request.getfixturevalue("perturbed_cli"))
    env = {**ENGINE_ENV, **SEED_PROBE_ON, "VLLM_PLUGINS": "sjdpp,sjdpp_images"}
    args = ["--speculative-config", "sjdpp", "--dtype", "float32", "--max-model-len", str(GENERATED_LENGTH + 64),
            "--max-num-seqs", "8", "--enforce-eager"]
    log = tmp_path / "server.log"
    with server.vllm_server(str(DEFAULT_OUT), args, log, env=env, timeout_s=240) as base:
        out = client_for(base).images.generate(model=str(DEFAULT_OUT), prompt="a handwritten 1", extra_body={"seed": 3})
    assert out.data[0].model_extra["sjdpp"]["seed_identical"] is (not perturbed)
    said = "depend on the shape of the pass" if perturbed else "bit-identical"
    assert said in log.read_text()
