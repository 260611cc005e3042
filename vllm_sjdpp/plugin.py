"""vLLM plugin entry points (setup.py).

- `sjdpp` (`vllm.general_plugins`, loaded in every vLLM process): the engine side, `register`.
- `sjdpp_images` (`vllm.endpoint_plugins`, the API server only): the images endpoint
  (serving.images_api).  vLLM loads endpoint plugins only when `VLLM_PLUGINS` names them, and
  that variable then filters the general plugins too, so serving images takes
  `VLLM_PLUGINS=sjdpp,sjdpp_images`.
- `sjdpp_images` (`vllm.general_plugins` too): `require_engine_plugin`, so that a `VLLM_PLUGINS`
  naming the endpoint without the engine side stops `vllm serve` with the fix instead of
  vLLM's "Value sjdpp cannot be converted to <function loads ...>".

vLLM matches `VLLM_PLUGINS`' comma-separated names exactly (`vllm/envs.py`, `plugins/__init__.py`):
a space or a capital letter silently drops a plugin (`config.plugins_advice` names it).
"""

from __future__ import annotations

import os

from .config import ENGINE_PLUGIN, plugins_advice


def register() -> None:
    from .patches import apply

    apply()


def require_engine_plugin() -> None:
    """The `sjdpp_images` general plugin: loaded where `VLLM_PLUGINS` names the endpoint (or is
    unset).  Stops the process, naming the fix, where the engine plugin is not loaded with it."""
    value = os.environ.get("VLLM_PLUGINS")
    if value is not None and ENGINE_PLUGIN not in value.split(","):
        raise SystemExit(f"vllm-sjdpp: {plugins_advice(value)}")
