"""The dtype a float32 checkpoint is served in on a CPU (patches.model_config): float32 for the
plugin's guided architectures where the CPU has no native bf16, vLLM's bf16 elsewhere, and a
user's --dtype always."""

import logging

import pytest
import torch

from vllm_sjdpp import machine
from vllm_sjdpp.patches import model_config

X86_AVX2 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma f16c\n"
X86_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16 avx512_vnni\n"
X86_AMX = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n"
ARM_V82 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics\n"
ARM_V86 = "processor\t: 0\nFeatures\t: fp asimd atomics sve sve2 bf16 i8mm\n"


@pytest.mark.parametrize("arch, cpuinfo, native", [
    ("x86_64", X86_AVX2, False), ("x86_64", X86_BF16, True), ("x86_64", X86_AMX, True),
    ("aarch64", ARM_V82, False), ("aarch64", ARM_V86, True),
    ("x86_64", "", None), ("riscv64", X86_AVX2, None),
])
def test_native_bf16_from_cpuinfo(arch, cpuinfo, native):
    assert machine.native_bf16(arch, machine.cpu_features(cpuinfo)) is native


@pytest.fixture
def cpu_flags(monkeypatch):
    """Set the CPU the patch sees: `cpu_flags(native)`."""
    from vllm.plugins import load_general_plugins

    load_general_plugins()

    def set_native(native):
        monkeypatch.setattr(machine, "native_bf16", lambda: native)

    return set_native


def served_dtype(folder, dtype="auto"):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(folder), dtype=dtype, skip_tokenizer_init=True).create_model_config().dtype


@pytest.fixture(scope="module")
def digit_model():
    from vllm_sjdpp.digits.train import DEFAULT_OUT

    return DEFAULT_OUT


@pytest.mark.parametrize("native, expected", [(False, torch.float32), (True, torch.bfloat16), (None, torch.bfloat16)])
def test_float32_guided_checkpoint_follows_the_cpu(cpu_flags, digit_model, caplog, native, expected):
    """The bundled digit model (a float32 GuidedLlamaForCausalLM) keeps float32 on an AVX2 CPU,
    with one line naming why; where bf16 is native, or unknown, vLLM's downcast stands."""
    cpu_flags(native)
    with caplog.at_level(logging.INFO, logger="vllm.sjdpp"):
        assert served_dtype(digit_model) == expected
    said = [r.getMessage() for r in caplog.records if "no native bf16" in r.getMessage()]
    assert len(said) == (1 if native is False else 0)


@pytest.mark.parametrize("dtype, expected", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                             ("float32", torch.float32)])
def test_explicit_dtype_wins(cpu_flags, digit_model, dtype, expected):
    cpu_flags(False)
    assert served_dtype(digit_model, dtype) == expected


def test_other_architectures_keep_vllms_choice(cpu_flags, tiny_llama_path, tiny_janus_path, tiny_emu3_path):
    """A plain Llama is not this plugin's to change; Janus and Emu3 folders are."""
    cpu_flags(False)
    assert served_dtype(tiny_llama_path) == torch.bfloat16
    assert served_dtype(tiny_janus_path) == torch.float32
    assert served_dtype(tiny_emu3_path) == torch.float32
    cpu_flags(True)
    assert served_dtype(tiny_janus_path) == torch.bfloat16


def test_cpu_name():
    assert machine.cpu_name("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t: avx2\n") == "AMD EPYC 7B13"


def test_only_float32_checkpoints_change():
    """A bf16 checkpoint was made for bf16: it stays, as do float16 choices."""
    archs = ["GuidedLlamaForCausalLM"]
    assert model_config.cpu_dtype(archs, torch.bfloat16, torch.bfloat16, False) == torch.bfloat16
    assert model_config.cpu_dtype(archs, torch.float32, torch.float16, False) == torch.float16
    assert model_config.cpu_dtype(archs, torch.float32, torch.bfloat16, False) == torch.float32
    assert model_config.cpu_dtype(["LlamaForCausalLM"], torch.float32, torch.bfloat16, False) == torch.bfloat16
