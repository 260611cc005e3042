"""The engine step: SJD++ inside vLLM's model runner, one step at a time.

Owns: the per-request SJD++ state of a runner (`runtime`: the Jacobi windows and their proposal
rows, the running batch's per-request facts, the goodput controller, the statistics and the
draft guard), the sampler that verifies and redrafts in the place of vLLM's rejection sampler
(`sampler`), the drafter vLLM asks for windows (`proposer`), and how windows are sized
(`goodput`, `window_budget`).

May import: `vllm_sjdpp.kernels` (the step's math), `vllm_sjdpp.config` (the options),
`vllm_sjdpp.families` (logits per position), and vLLM.  Nothing here knows guidance or serving.
"""
