"""The vLLM engine backend: prefix-tuned GPT-2 served by vLLM's engine.

Layout:
- `model.py`: our prefix GPT-2 for vLLM (virtual tokens carry each task's prefix K/V), registered with
  vLLM by `plugin.register` (the `vllm.general_plugins` entry point of this package);
- `bart_model.py`: our prefix BART for vLLM (encoder, decoder and cross-attention prefixes from one table),
  `bart_inputs.py` its encoder-input processor (vLLM runs the encoder as a multimodal encoder),
  `bart_prompt.py` the prompt and table rows of a BART request (docs/encoder-decoder.md, "On vLLM");
- `worker.py`: the worker extension through which the engine writes prefix rows into the model's table;
- `rows.py`: which table rows hold which (tenant, task, version) prefix (pure bookkeeping, LRU);
- `params.py`: our `SamplingParams` as vLLM's;
- `engine.py`: `VllmEngine`, the same public API as `server.engine.Engine` over vLLM's `AsyncLLM`;
- `support.py`: whether vLLM can serve a model here (selection, `PREFIXSERVE_ENGINE`; BART's own
  conditions in `bart_unsupported_reason`).

Importing this package imports neither torch nor vLLM: vLLM loads the plugin in its own processes.
"""
