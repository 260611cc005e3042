"""Patches of vllm/plugins/__init__.py: the images route answers why it is missing.

vLLM loads endpoint plugins only when `VLLM_PLUGINS` names them, and a missing one leaves
`POST /v1/images/generations` a bare 404.  `load_endpoint_plugins` (looked up by attribute from
`attach_endpoint_plugins` at each app build) also returns, where `sjdpp_images` is not among the
plugins it loaded, a stand-in whose route names the `VLLM_PLUGINS` fix
(`serving.images_api.MissingImagesEndpoint`).  The stand-in comes first: vLLM lets a later
plugin's route replace an earlier one, so another plugin's images route is never shadowed.
Optional (`internals`): without the function, the 404 stays vLLM's.
"""

from __future__ import annotations

import functools
import os

from .internals import available


def apply() -> None:
    if not available("vllm.plugins", "load_endpoint_plugins"):
        return
    import vllm.plugins as plugins

    load_endpoint_plugins = plugins.load_endpoint_plugins

    @functools.wraps(load_endpoint_plugins)
    def load_endpoint_plugins_naming_ours(*args, **kwargs):
        from ..config import ENDPOINT_PLUGIN, plugins_advice
        from ..serving.images_api import MissingImagesEndpoint

        loaded = load_endpoint_plugins(*args, **kwargs)
        if any(getattr(p, "name", None) == ENDPOINT_PLUGIN for p in loaded):
            return loaded
        advice = plugins_advice(os.environ.get("VLLM_PLUGINS"))
        missing = MissingImagesEndpoint(advice or f"the {ENDPOINT_PLUGIN} endpoint plugin did not load (see the log)")
        return [missing, *loaded]

    plugins.load_endpoint_plugins = load_endpoint_plugins_naming_ours
