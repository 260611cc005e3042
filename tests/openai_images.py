"""Helpers of the images endpoint tests: the real openai client on a server, and its PNGs."""

from __future__ import annotations

import base64
import io


def client_for(base_url: str):
    """The openai client on a server started by the tests (no retries: a failure shows)."""
    from openai import OpenAI

    return OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def png(b64: str):
    """A response's b64_json -> the PIL image, which must be a PNG."""
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return image
