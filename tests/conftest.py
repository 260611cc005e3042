import os
import sys

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The variable is
# read when a kernel is defined, so it must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from stall_guard import StallGuard  # noqa: E402
from tiny_llama import build_tiny_llama, set_engine_env  # noqa: E402

# In-process engines (tiny_llama.ENGINE_ENV): set before any test module imports vLLM.
set_engine_env()


def _server_checking_fallbacks():
    """`vllm_sjdpp.serving.server.vllm_server` for the tests: a server runs its engine in a child
    process, out of reach of `no_step_fallbacks`, so its log is read when it stops and an SJD++
    step or proposal that fell back there fails the test.  Installed before any test module
    imports the name."""
    import contextlib

    from vllm_sjdpp.serving import server

    start = server.vllm_server

    @contextlib.contextmanager
    def vllm_server(model, args, log_path, *more, **kwargs):
        with start(model, args, log_path, *more, **kwargs) as base:
            yield base
        fell_back = [line for line in open(log_path, errors="replace") if "SJD++ " in line and " failed for requests " in line]
        assert not fell_back, f"SJD++ fell back to plain sampling in the server ({log_path}): {fell_back[0]}"

    server.vllm_server = vllm_server


_server_checking_fallbacks()


def _engines_without_whole_heap_collections():
    """In-process engines start and stop in about a quarter of the time (0.4 s and 0.25 s against
    1.75 s and 1.55 s for a tiny Llama on the 2-core test machine).

    vLLM freezes the garbage collector's heap when an engine starts (`freeze_gc_heap`) and
    unfreezes it when one shuts down, around half a dozen full collections in all, and each full
    collection walks the ~750 k objects that importing torch, vLLM and transformers created:
    about 0.4 s each here, for every engine a test starts.  For the test process those imports are
    frozen once, here, and vLLM's freeze and unfreeze are left out, so an engine's own objects stay
    in the young generations and are collected when the test drops it
    (`tests/test_folder_fuzz.py` checks that resident memory comes back).  Servers the tests start
    in a child process (`vllm serve`) run as users run them.  Without vLLM (the kernel tests on a
    device machine) nothing to do."""
    import gc
    import importlib
    import types

    try:
        from vllm.platforms import current_platform
    except ImportError:
        return
    # What an engine's start imports, imported now to be frozen with the rest (the CPU worker's
    # modules only on the CPU platform: importing them rebinds torch.cuda's streams and events).
    cpu = ("vllm.v1.worker.cpu_worker", "vllm.v1.worker.cpu_model_runner") if current_platform.is_cpu() else ()
    for name in ("vllm.entrypoints.llm", "vllm.v1.engine.llm_engine", *cpu, "vllm.v1.executor.uniproc_executor",
                 "vllm.model_executor.models.llama", "vllm_sjdpp.patches"):
        importlib.import_module(name)
    # The modules that freeze and unfreeze (vLLM 0.32).
    for name in ("vllm.v1.engine.core", "vllm.v1.worker.gpu_worker", "vllm.distributed.parallel_state"):
        module = importlib.import_module(name)
        if hasattr(module, "freeze_gc_heap"):
            module.freeze_gc_heap = lambda: None
        if getattr(module, "gc", None) is gc:
            module.gc = types.SimpleNamespace(**{attr: getattr(gc, attr) for attr in dir(gc) if not attr.startswith("__")})
            module.gc.unfreeze = lambda: None
    gc.collect()
    gc.freeze()


_engines_without_whole_heap_collections()

# Every in-process engine the tests start (`make_engine`): these, and each module's overrides.
ENGINE_DEFAULTS = dict(
    skip_tokenizer_init=True, enforce_eager=True, max_model_len=256, dtype="float32", seed=0,
    disable_log_stats=False,
)


@pytest.fixture(scope="session")
def make_engine():
    """`make_engine(folder, **overrides)`: an in-process `vllm.LLM` on `folder` with
    ENGINE_DEFAULTS updated by `overrides`.  Modules keep their engines in module-scoped
    fixtures built with it (engines are not shared across modules: each holds its KV cache).
    vLLM's metrics registry is per process: `llm.get_metrics()` reads the newest engine's.
    Each engine's steps are bounded (tests/stall_guard.py): a livelock fails the test."""

    def make(folder, **overrides):
        from vllm import LLM

        llm = LLM(str(folder), **{**ENGINE_DEFAULTS, **overrides})
        StallGuard(llm)
        return llm

    return make


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory):
    """The tiny Llama (tests/tiny_llama.py: vocabulary 48, sharpness 12), built once per session."""
    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def tiny_guided_path(tmp_path_factory):
    """The tiny guided Llama (classifier-free guidance, the rule in tests/tiny_llama.py) with
    grouped queries (2 query heads, 1 KV head), built once per session."""
    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny-guided"), guided=True, num_key_value_heads=1))


@pytest.fixture(scope="session")
def hf_guided(tiny_guided_path):
    """The tiny guided Llama's weights in transformers (`LlamaForCausalLM`), the guidance tests'
    reference; no EOS (the engines run with ignore_eos)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_guided_path).eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="session")
def tiny_grid_path(tmp_path_factory):
    """The tiny guided Llama with a stream grid (tests/tiny_llama.py TINY_GRID_CONFIG), built once."""
    from tiny_llama import TINY_GRID_CONFIG

    return str(build_tiny_llama(
        tmp_path_factory.mktemp("tiny-grid"), guided=True, num_key_value_heads=1, extra_config=TINY_GRID_CONFIG
    ))


@pytest.fixture(scope="session")
def tiny_lumina_path(tmp_path_factory):
    """A tiny random Lumina-mGPT folder with Lumina-mGPT-7B-768's real ids and shapes
    (tests/tiny_lumina.py: vocabulary 65536, 8192 codes at 4..8195, context 4096, 48 x 48 default
    grid), built once."""
    from tiny_lumina import build_tiny_lumina

    return str(build_tiny_lumina(tmp_path_factory.mktemp("tiny-lumina")))


@pytest.fixture(scope="session")
def tiny_emu3_path(tmp_path_factory):
    """A tiny random Emu3 folder with Emu3-Gen's real ids and shapes (tests/tiny_emu3.py: text
    vocabulary 184622, 32768 visual tokens, context 9216, 90 x 90 default grid), built once."""
    from tiny_emu3 import build_tiny_emu3

    return str(build_tiny_emu3(tmp_path_factory.mktemp("tiny-emu3")))


@pytest.fixture(scope="session")
def tiny_janus_path(tmp_path_factory):
    """A tiny random Janus folder (tests/tiny_janus.py), built once per session."""
    from tiny_janus import build_tiny_janus

    return str(build_tiny_janus(tmp_path_factory.mktemp("tiny-janus")))


@pytest.fixture(scope="session")
def janus_pro_path(tmp_path_factory):
    """A tiny random Janus folder with Janus-Pro's real ids and shapes (tests/tiny_janus.py
    JANUS_PRO: text vocabulary 102400, 16384 codes, 24x24 grid, 384 px), built once per session."""
    from tiny_janus import JANUS_PRO, build_tiny_janus

    return str(build_tiny_janus(tmp_path_factory.mktemp("janus-pro-shaped"), JANUS_PRO))


@pytest.fixture(autouse=True)
def no_step_fallbacks(request):
    """Fail any test in which an in-process SJD++ engine's step (or proposal) fell back to plain
    sampling, unless the test is marked `expect_fallback`: a fallback is exact, so exactness
    tests would pass while SJD++ silently stopped working."""

    def total() -> float:
        runtime = sys.modules.get("vllm_sjdpp.engine.runtime")  # never imported: no engine ran
        return runtime.fallbacks_total() if runtime is not None else 0.0

    before = total()
    yield
    if request.node.get_closest_marker("expect_fallback") is None:
        assert total() == before, "an SJD++ step fell back to plain sampling (see the log for its cause)"


@pytest.fixture(scope="module", params=["small", "janus-pro-shaped"])
def janus_shape(request):
    """Every Janus test runs on both folders: the small one and Janus-Pro's real shapes."""
    from tiny_janus import JANUS_PRO, SMALL

    return SMALL if request.param == "small" else JANUS_PRO


@pytest.fixture(scope="module")
def janus_folder(request, janus_shape):
    from tiny_janus import SMALL

    return request.getfixturevalue("tiny_janus_path" if janus_shape is SMALL else "janus_pro_path")


def pytest_unconfigure(config):
    """The frozen heap given back to the collector before the interpreter exits, as a process
    that never froze it would have it (nanobind, in Triton, reports its objects left alive)."""
    import gc

    gc.unfreeze()
