"""vLLM general plugin (entry point `vllm.general_plugins`: sjdpp), loaded in every vLLM process."""


def register() -> None:
    from .vllm_patches import apply

    apply()
