"""Classifier-free guidance inside vLLM and the guided model classes.

Owns: the guidance formula, the per-request options (scale, unconditional prompt) and the
batch's per-token guidance inputs (`cfg`); one module per guided architecture: `llama`
(`GuidedLlamaForCausalLM`, both branches in one pass or one per sequence) and `janus` (Janus
folders generating images).  The model classes are loaded by vLLM's model registry from the names `patches`
registers, never imported at plugin load.

May import: `vllm_sjdpp.families` (a folder's unconditional rule and facts) and vLLM's model
layers.  Nothing here knows the SJD++ step or serving.
"""
