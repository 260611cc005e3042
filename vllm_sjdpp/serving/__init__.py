"""Serving images: the OpenAI images endpoint (`images_api`, a vLLM endpoint plugin), `vllm
serve` as a child process on loopback (`server`) and the text-to-PNG client (`client`).

May import: `vllm_sjdpp.families` (prompts and image decoders), `vllm_sjdpp.config` and
`vllm_sjdpp.guidance.cfg` (the names of per-request options), and vLLM's public entry points.
The engine step and the patches are never imported from here.
"""
