"""The vLLM engine backend: prefix-tuned GPT-2 served by vLLM's engine.

Layout:
- `model.py`: our prefix GPT-2 for vLLM (virtual tokens carry each task's prefix K/V), registered with
  vLLM by `plugin.register` (the `vllm.general_plugins` entry point of this package);
- `worker.py`: the worker extension through which the engine writes prefix rows into the model's table;
- `rows.py`: which table rows hold which (tenant, task, version) prefix (pure bookkeeping, LRU);
- `params.py`: our `SamplingParams` as vLLM's;
- `engine.py`: `VllmEngine`, the same public API as `server.engine.Engine` over vLLM's `AsyncLLM`;
- `support.py`: whether vLLM can serve a model here (selection, `PREFIXSERVE_ENGINE`).

Importing this package imports neither torch nor vLLM: vLLM loads the plugin in its own processes.
"""
