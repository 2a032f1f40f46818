"""Moving prefix artifacts between the host tier and the device.

On CUDA the host tier keeps its tensors in pinned memory, and a host->device copy is queued on a
side stream (`non_blocking`) with an event recorded after it: the copy overlaps the model's steps,
and only the step that first uses the prefix waits for it, on the GPU (`wait_until_ready`: the
compute stream waits on the event; the host does not). The copy is issued from a worker thread, so
the event loop never waits for it either. On CPU (or any device without streams) the same code
runs with plain copies and no event.

Until its event completes, a device copy's memory is undefined: anything that reads it back on the
host (`back_to_host`, a demotion with no host copy at hand) must wait on the event first, because
the copy back runs on the current stream, which knows nothing of the side stream's work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from prefix_store.artifact import PrefixArtifact


@dataclass(frozen=True)
class DevicePrefix:
    """An artifact on the device, and the event its copy completes at (None: ready already)."""

    artifact: PrefixArtifact
    ready: Any = None  # torch.cuda.Event | None


class PrefixTransfer:
    """Host <-> device copies of artifacts for one serving device and dtype."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.uses_streams = self.device.type == "cuda"
        self._stream: Any = torch.cuda.Stream(self.device) if self.uses_streams else None

    def to_host(self, artifact: PrefixArtifact) -> PrefixArtifact:
        """The host-tier copy in the serving dtype: pinned on CUDA, so copies to the device are async."""
        host = artifact.to("cpu", self.dtype)
        if not self.uses_streams:
            return host
        pinned = {kind: t if t.is_pinned() else t.pin_memory() for kind, t in host.prefixes.items()}
        return PrefixArtifact(prefixes=pinned, metadata=host.metadata)

    def back_to_host(self, prefix: DevicePrefix) -> PrefixArtifact:
        """The host-tier copy of a device prefix, read only once its copy to the device has completed.

        Blocks the calling thread until then (rare: a demotion keeps the host copy the prefix came
        from, so this runs only for a device prefix that has none).
        """
        if prefix.ready is not None:
            prefix.ready.synchronize()
        return self.to_host(prefix.artifact)

    def to_device(self, artifact: PrefixArtifact) -> DevicePrefix:
        """Queue the copy to the device (worker thread: on CUDA it returns before the copy is done)."""
        if not self.uses_streams:
            return DevicePrefix(artifact.to(self.device, self.dtype))
        with torch.cuda.stream(self._stream):
            moved = {
                kind: t.to(self.device, self.dtype, non_blocking=True)
                for kind, t in artifact.prefixes.items()
            }
            ready = torch.cuda.Event()
            ready.record(self._stream)
        return DevicePrefix(PrefixArtifact(prefixes=moved, metadata=artifact.metadata), ready)


def wait_until_ready(prefix: DevicePrefix) -> None:
    """Make the current (compute) stream wait for the prefix's copy; call where the step runs.

    `record_stream` tells the caching allocator the tensors (allocated on the side stream) are used
    on the compute stream, so their memory is not reused before the compute stream is done with them.
    """
    if prefix.ready is None:
        return
    tensors = list(prefix.artifact.prefixes.values())
    stream = torch.cuda.current_stream(tensors[0].device)
    stream.wait_event(prefix.ready)
    for tensor in tensors:
        tensor.record_stream(stream)
