"""vLLM plugin entry points, loaded in every vLLM process.

- `sjdpp` (`vllm.general_plugins`): the engine side, `register`.
- `sjdpp_images` (`vllm.endpoint_plugins`): the images endpoint (serving.images_api).  vLLM loads
  endpoint plugins only when `VLLM_PLUGINS` names them, and that variable then filters the
  general plugins too, so serving images takes `VLLM_PLUGINS=sjdpp,sjdpp_images`.
- `sjdpp_images` (`vllm.general_plugins` too): `require_engine_plugin`, so that a `VLLM_PLUGINS`
  naming the endpoint without the engine side stops `vllm serve` with the fix instead of
  vLLM's "Value sjdpp cannot be converted to <function loads ...>".

vLLM matches `VLLM_PLUGINS`' comma-separated names exactly (`vllm/envs.py`, `plugins/__init__.py`):
a space or a capital letter silently drops a plugin.
"""

from __future__ import annotations

ENGINE_PLUGIN, ENDPOINT_PLUGIN = "sjdpp", "sjdpp_images"
PLUGINS_FIX = f"VLLM_PLUGINS={ENGINE_PLUGIN},{ENDPOINT_PLUGIN}"


def register() -> None:
    from .patches import apply

    apply()


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


def require_engine_plugin() -> None:
    """The `sjdpp_images` general plugin: loaded where `VLLM_PLUGINS` names the endpoint (or is
    unset).  Stops the process, naming the fix, where the engine plugin is not loaded with it."""
    import os

    value = os.environ.get("VLLM_PLUGINS")
    if value is not None and ENGINE_PLUGIN not in value.split(","):
        raise SystemExit(f"vllm-sjdpp: {plugins_advice(value)}")
