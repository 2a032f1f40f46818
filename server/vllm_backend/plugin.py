"""The `vllm.general_plugins` entry point: registers our prefix GPT-2 with vLLM's model registry.

vLLM calls `register()` in every process it starts (front end, engine core, workers); registering by
qualified name keeps it cheap and idempotent (the model module is imported only when it is built).
"""

ARCHITECTURE = "PrefixServeGPT2LMHeadModel"


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "server.vllm_backend.model:PrefixServeGPT2LMHeadModel")
