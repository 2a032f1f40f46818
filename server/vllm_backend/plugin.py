"""The `vllm.general_plugins` entry point: registers our prefix models with vLLM's model registry.

vLLM calls `register()` in every process it starts (front end, engine core, workers); registering by
qualified name keeps it cheap and idempotent (a model module is imported only when it is built).
"""

ARCHITECTURE = "PrefixServeGPT2LMHeadModel"
BART_ARCHITECTURE = "PrefixServeBartForConditionalGeneration"

_MODELS = {
    ARCHITECTURE: "server.vllm_backend.model:PrefixServeGPT2LMHeadModel",
    BART_ARCHITECTURE: "server.vllm_backend.bart_model:PrefixServeBartForConditionalGeneration",
}


def register() -> None:
    from vllm import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    for architecture, qualified_name in _MODELS.items():
        if architecture not in supported:
            ModelRegistry.register_model(architecture, qualified_name)
