"""A class-conditional digit generator trained on scikit-learn's digits, for demos and benchmarks.

It spans two layers.  Its formats (`vq`: the image tokenizer and codebook, `tokens`: the token
stream, `data`: the training images) sit with the families, which they define the digit family
for: they may import `vllm_sjdpp.families.rule` only.  Its scripts (`train`, `quality`, `demo`)
are applications on top: they may import the families and `vllm_sjdpp.serving`.
"""
