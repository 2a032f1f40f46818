"""Runners: serve one `Workload` and return a `RunResult` of per-request records.

| runner        | what it is                                                                 |
|---------------|----------------------------------------------------------------------------|
| engine        | prefixserve's engine in-process: continuous batching, rows of mixed tasks |
| no_prefix     | the same engine with every request's task removed (the upper bound)       |
| http          | the prefixserve server as a subprocess, streamed over loopback HTTP       |
| naive_peft    | HF PEFT, one request at a time, switching adapters per request            |
| static_batch  | HF PEFT, one task's requests per batch, the batch runs to its longest one |
| vllm_bare     | stock vLLM's OpenAI server on the same model, bare model, over HTTP       |
| server_vllm   | `http` with PREFIXSERVE_ENGINE=vllm (our server on the vLLM backend)      |
| server_native | `http` with PREFIXSERVE_ENGINE=native (our server on our own engine)      |
| ctranslate2_fp32, ctranslate2_int8 | BART: CTranslate2's `translate_batch`, static batches, bare |
| hf_generate   | BART: HF `generate`, static batches, bare                                 |

Every runner makes exactly `max_new_tokens` tokens per request (EOS cannot stop it early where the
runner allows that; otherwise the short outputs are counted as they are, see `num_short_outputs`).
"""
