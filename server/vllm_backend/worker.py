"""The worker extension (vLLM's `worker_extension_cls`): how the engine writes prefixes into the model.

vLLM mixes this class into its worker; `AsyncLLM.collective_rpc("prefixserve_write_rows", ...)` calls
the method in the worker's process between steps. The prefix travels as raw bytes in the serving dtype
plus its dtype's name and shape (vLLM's utility-call encoding turns a tensor argument into nested
lists; bytes stay bytes), and nothing is unpickled (unlike `LLM.apply_model`, which needs vLLM's
insecure serialization). On CUDA the bytes go to the device from pinned memory, asynchronously: the
table's copy is ordered before the next step on the same stream.
"""

import hashlib

import torch

# The dtypes a prefix travels in, by name (the serving dtypes).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def encode_prefix(kv: torch.Tensor, dtype: torch.dtype) -> tuple[bytes, str, list[int], str]:
    """`kv` [layers, 2, L, hidden] in `dtype` as (bytes, dtype name, shape, digest of the bytes): what
    `prefixserve_write_rows` takes, and what a request's cache salt names."""
    flat = kv.detach().to("cpu", dtype).contiguous()
    data = flat.view(torch.uint8).numpy().tobytes()  # numpy has no bfloat16: travel as raw bytes
    name = next(n for n, d in DTYPES.items() if d == dtype)
    return data, name, list(flat.shape), hashlib.blake2b(data, digest_size=12).hexdigest()


class PrefixRowsExtension:
    """Methods added to vLLM's worker (`self` is the worker)."""

    def prefixserve_write_rows(
        self, rows: list[int], data: bytes, dtype: str, shape: list[int], kind: str = "decoder"
    ) -> None:
        """Write a prefix (`encode_prefix`'s bytes, dtype and shape) into rows `rows` of the table.
        `kind` is the prefix kind ("decoder" for GPT-2; BART also has "encoder" and "cross")."""
        kv = torch.frombuffer(bytearray(data), dtype=DTYPES[dtype]).reshape(shape)
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        device = next(model.parameters()).device
        if device.type == "cuda":
            kv = kv.pin_memory().to(device, non_blocking=True)
        model.write_prefix_rows(list(rows), kv, kind)
