"""vLLM general plugin (entry point `vllm.general_plugins`: sjdpp), loaded in every vLLM process."""


def register() -> None:
    from .patches import apply

    apply()
