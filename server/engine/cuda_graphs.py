"""Decode-only steps through the static path (`static_decode.py`), replayed as CUDA graphs per bucket.

A GPT-2 decode step is a few hundred small kernels (gpt2-medium: ~360); on a GPU their launches, not
their arithmetic, set the step time. A CUDA graph records them once and replays them with one launch.
A graph replays fixed addresses and shapes, so each bucket key `(B, W, A)` gets its own graph and its
own integer input buffer; a step copies its inputs into that buffer (one non-blocking copy from pinned
memory) and replays. Logits land in one shared buffer `[max B, V]` (so graphs hold no output memory of
their own) and all graphs share one memory pool.

At engine start `warm_up` captures the common keys (`warm_up_keys`: short rows, no or short prefixes,
every batch bucket; at most half the cap), so the first requests do not pay capture time; other keys are
captured lazily, the first time a key is met, up to `max_graphs` (`Limits.max_cuda_graphs`;
each capture costs a few milliseconds and a little pool memory); keys beyond that run the static path eagerly. Production safety:
right after capturing a key, the graph is replayed once and compared with the same step run eagerly; on
a mismatch beyond the dtype's tolerance (or a capture that raises) a warning is logged, every graph is
dropped and the decoder runs eagerly from then on (the step's result is the eager one, so nothing wrong is ever returned). K/V writes
of the step are idempotent (the same values to the same slots), so running it several times is harmless.

The capture function is a parameter (`GraphCapture`): `cuda_graph_capture` on CUDA; tests on CPU pass a
stand-in to exercise keys, buffers, the bound and the fallback. `torch_compile` compiles the per-layer
block output (attention projection + MLP, `modeling.gpt2.block_output`) for the static path, where the
shapes are bucketed so it compiles once per bucket shape rather than per step; the compiled kernels are
then captured in the graphs like any other. If the compiled function raises (no C compiler, an
unsupported op), a warning is logged and the decoder runs the uncompiled function from then on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from modeling import gpt2
from server.engine.prefix_arena import PrefixArena
from server.engine.static_decode import (
    BlockOutput,
    BucketKey,
    build_static_step,
    geometric_buckets,
    static_forward,
)
from server.limits import DEFAULT_LIMITS

if TYPE_CHECKING:
    from server.engine.gpt2_parts import GPT2Parts

log = logging.getLogger(__name__)

Replay = Callable[[], None]
GraphCapture = Callable[[Replay], Replay]  # records a step function, returns what replays it

# Warm-up captures own-token widths up to this many positions (`StaticDecoder.warm_up_keys`).
WARM_UP_MAX_WIDTH = 256

# |graph - eager| allowed at the first replay, relative to the logits' scale: the same kernels replayed
# agree to rounding; a real mismatch (stale buffer, wrong address) is off by far more.
_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def cuda_graph_capture(device: torch.device) -> GraphCapture:
    """Capture on CUDA: warm up on a side stream (allocations, compilation), then record into one pool."""
    pool = torch.cuda.graph_pool_handle()

    def capture(step: Replay) -> Replay:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the engine's other threads (prefix loads) may use CUDA while this one captures
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            step()
        return graph.replay

    return capture


@dataclass
class StaticDecodeStats:
    static_steps: int = 0  # decode steps that took the static path (graph or eager)
    graph_replays: int = 0
    graph_captures: int = 0
    keys_seen: set[BucketKey] = field(default_factory=set)


@dataclass
class _Graph:
    inputs: Tensor  # [7 * B + B * W] int64, the buffer the graph reads
    replay: Replay


class StaticDecoder:
    """Runs a runner's decode-only steps on the static path; replays them as graphs when given `capture`."""

    def __init__(
        self,
        runner: GPT2Parts,
        capture: GraphCapture | None = None,
        torch_compile: bool = False,
        arena_tokens: int = DEFAULT_LIMITS.static_prefix_arena_tokens,
        max_graphs: int = DEFAULT_LIMITS.max_cuda_graphs,
    ) -> None:
        self.runner = runner
        block_size = runner.cache.block_size
        self.row_buckets = geometric_buckets(runner.max_rows)
        self.width_buckets = geometric_buckets(runner.max_positions, block_size)
        self.arena_buckets = geometric_buckets(arena_tokens, block_size)
        self.arena = PrefixArena(
            len(runner.blocks),
            runner.num_heads,
            runner.head_dim,
            self.arena_buckets[-1],
            runner.dtype,
            runner.device,
        )
        self.block_output: BlockOutput = (
            torch.compile(gpt2.block_output) if torch_compile else gpt2.block_output
        )
        self.capture = capture
        self.max_graphs = max_graphs
        self.graphs: dict[BucketKey, _Graph] = {}
        self.logits = torch.empty(self.row_buckets[-1], runner.vocab_size, device=runner.device)  # [max B, V]
        self.stats = StaticDecodeStats()

    @staticmethod
    def buffer_bytes(
        num_layers: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        max_rows: int,
        vocab_size: int,
        arena_tokens: int,
        block_size: int,
    ) -> int:
        """Bytes of the buffers a decoder allocates at construction: the prefix arena (keys and values,
        `arena_tokens` rounded up to blocks) and the float32 logits buffer; what `nbytes` reports."""
        capacity = geometric_buckets(arena_tokens, block_size)[-1]
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * num_heads * capacity * head_dim * element + max_rows * vocab_size * 4

    @property
    def nbytes(self) -> int:
        """Device bytes of the arena and the logits buffer (graph pools not included)."""
        tensors = (self.arena.keys, self.arena.values, self.logits)
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def graphs_enabled(self) -> bool:
        return self.capture is not None

    def step(self, decode_tokens: dict[str, int]) -> tuple[list[str], Tensor] | None:
        """One decode step -> (request ids, logits [N, V] float32); None (nothing changed) if no bucket fits."""
        step = build_static_step(
            self.runner, self.arena, decode_tokens, self.row_buckets, self.width_buckets, self.arena_buckets
        )
        if step is None:
            return None
        key = step.key
        host = torch.tensor(step.ints, dtype=torch.long)  # [7 * B + B * W]
        if self.runner.device.type == "cuda":
            host = host.pin_memory()
        graph = self.graphs.get(key)
        if graph is not None:
            graph.inputs.copy_(host, non_blocking=True)
            graph.replay()
            self.stats.graph_replays += 1
        else:
            inputs = host.to(self.runner.device, non_blocking=True)
            if self.capture is not None and len(self.graphs) < self.max_graphs:
                self._capture(key, inputs)  # leaves the eagerly computed logits in self.logits
            else:
                self._run(key, inputs)
        self.stats.static_steps += 1
        self.stats.keys_seen.add(key)
        return step.request_ids, self.logits[: len(step.request_ids)].clone()  # [N, V]

    def warm_up_keys(self, max_width: int = WARM_UP_MAX_WIDTH) -> list[BucketKey]:
        """The decode buckets captured at start (`warm_up`), the ones a server meets first and most:
        own-token widths up to `max_width` positions, arena widths 0 (no prefix) and the narrowest
        bucket (a few short prefixes), every row bucket; narrow before wide, small batches first. At
        most half of `max_graphs`: the rest stays for keys met later (long rows, many prefixes)."""
        widths = [w for w in self.width_buckets if w <= max_width] or self.width_buckets[:1]
        arenas = [0, self.arena_buckets[0]]
        keys = [BucketKey(b, w, a) for w in widths for a in arenas for b in self.row_buckets]
        return keys[: self.max_graphs // 2]

    def warm_up(self, keys: list[BucketKey] | None = None) -> list[BucketKey]:
        """Capture the graphs of `keys` (default `warm_up_keys()`) now, before any request, so the first
        requests do not pay capture time. Each capture is checked like a lazy one (replay == eager).
        Call with no rows decoding: the dummy step writes slot 0 of the pool, which holds nothing yet.
        Returns the keys captured (none when graphs are off, or turned off by a failed check)."""
        if self.capture is None:
            return []
        for key in self.warm_up_keys() if keys is None else keys:
            if self.capture is None or len(self.graphs) >= self.max_graphs:
                break
            if key not in self.graphs:
                self._capture(key, self._dummy_inputs(key))
        return list(self.graphs)

    def _dummy_inputs(self, key: BucketKey) -> Tensor:
        """A step of `key`'s shape whose rows all read and write slot 0, length 1, no prefix."""
        rows = [0, 0, 0, 0, 1, 0, 0]  # token, position, write slot, write source, length, prefix lo, hi
        ints = [value for value in rows for _ in range(key.rows)] + [0] * (key.rows * key.width)
        return torch.tensor(ints, dtype=torch.long, device=self.runner.device)  # [7 * B + B * W]

    def _run(self, key: BucketKey, inputs: Tensor) -> None:
        try:
            logits = static_forward(self.runner, self.arena, inputs, key, self.block_output)  # [B, V]
        except Exception as exc:
            if self.block_output is gpt2.block_output:
                raise
            # torch.compile failed (no compiler, an unsupported op): serve uncompiled rather than fail;
            # the step's K/V writes are idempotent, so running it again is safe
            log.warning("torch.compile'd decode step failed (%r): it runs uncompiled from now on", exc)
            self.block_output = gpt2.block_output
            logits = static_forward(self.runner, self.arena, inputs, key, self.block_output)
        self.logits[: key.rows].copy_(logits)

    def _capture(self, key: BucketKey, inputs: Tensor) -> None:
        """Capture `key`'s graph, replay it once and keep it only if it equals the eager step."""
        assert self.capture is not None
        try:
            replay = self.capture(lambda: self._run(key, inputs))
            self.stats.graph_captures += 1
            replay()
        except Exception as exc:  # a capture the device refuses: the eager step still serves
            self._run(key, inputs)
            self._graphs_off(key, f"capture failed ({exc!r})")
            return
        replayed = self.logits[: key.rows].clone()  # [B, V]
        self._run(key, inputs)
        eager = self.logits[: key.rows]  # [B, V]
        tolerance = _TOLERANCE.get(self.runner.dtype, 2e-2) * max(1.0, float(eager.abs().max()))
        error = float((replayed - eager).abs().max())
        if not error <= tolerance:  # also catches NaN
            self._graphs_off(
                key, f"replay differs from the eager step (max |diff| {error:.3g} > {tolerance:.3g})"
            )
            return
        self.graphs[key] = _Graph(inputs, replay)

    def _graphs_off(self, key: BucketKey, why: str) -> None:
        log.warning(
            "CUDA graph for decode bucket %s: %s; CUDA graphs are off for this process, decode runs eagerly",
            tuple(key),
            why,
        )
        self.capture = None
        self.graphs.clear()
