"""The worker extension (vLLM's `worker_extension_cls`): how the engine writes prefixes into the model.

vLLM mixes this class into its worker; `AsyncLLM.collective_rpc("prefixserve_write_rows", ...)` calls
the method in the worker's process between steps. The prefix travels as raw float32 bytes plus its
shape (vLLM's utility-call encoding turns a tensor argument into nested lists; bytes stay bytes), and
nothing is unpickled (unlike `LLM.apply_model`, which needs vLLM's insecure serialization).
"""

import torch


def encode_prefix(kv: torch.Tensor) -> tuple[bytes, list[int]]:
    """`kv` [layers, 2, L, hidden] as (float32 bytes, shape): what `prefixserve_write_rows` takes."""
    flat = kv.detach().to("cpu", torch.float32).contiguous()
    return flat.numpy().tobytes(), list(flat.shape)


class PrefixRowsExtension:
    """Methods added to vLLM's worker (`self` is the worker)."""

    def prefixserve_write_rows(
        self, rows: list[int], data: bytes, shape: list[int], kind: str = "decoder"
    ) -> None:
        """Write a prefix (`encode_prefix`'s bytes and shape) into rows `rows` of the prefix table.
        `kind` is the prefix kind ("decoder" for GPT-2; BART also has "encoder" and "cross")."""
        kv = torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(shape)
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        model.write_prefix_rows(list(rows), kv, kind)
