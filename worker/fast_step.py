"""The GPU training step, fast: static shapes per length bucket, and one micro-batch's forward, loss and backward
captured as a CUDA graph once per shape and replayed on every later micro-batch of that shape.

Why: a compiled step of the 0.1B model spends most of its time launching kernels from Python (the GPU idles between
them); a replayed graph launches the same kernels without that host work. What a replay computes is exactly what
running `forward_backward` eagerly on the same inputs computes (the same kernels in the same order on the same
addresses), so graphs change the speed of a run, not its numbers; bucketing the lengths does change the numbers
(more left padding on the prompt, more right padding on the answer), which is why it is part of the step mode that
a run's identity records.

How a step runs here:
- every parameter keeps one persistent gradient buffer; a step zeroes them, and each micro-batch's backward adds
  into them (autograd accumulates in place into an existing .grad), so micro-batches accumulate without copies;
- the loss of a micro-batch is Σ weight ⊙ token cross-entropy with the weights (the loss's normalisation, zero at
  padding) given as a tensor: the same graph serves any count of answer tokens;
- the first micro-batch of a new shape runs eagerly (this compiles and autotunes what it needs: nothing may compile
  during a capture), then its graph is recorded; later micro-batches of that shape copy their tokens and weights
  into the graph's static inputs and replay it;
- all graphs share one memory pool: a graph's temporaries may reuse another's, which is safe because graphs never
  run at the same time and each graph's only output, the loss, is read right after its replay.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker.batches import Batch, forward_answer_logits

# graphs kept per run: a run meets a few length buckets; the least recently used graph goes first past this
MAX_GRAPHS = 16


def bucket_length(n: int) -> int:
    """The static length a sequence of n tokens is padded to: n itself up to 16, then the next multiple of a quarter
    of the power of two below n (17..32 -> 20, 24, 28, 32; 33..64 -> 40, 48, ...; 1025..2048 -> 1280, 1536, ...),
    so that padding costs at most 25% and a run meets few distinct shapes."""
    if n < 1:
        raise ValueError(f"a length must be >= 1, got {n}")
    if n <= 16:
        return n
    step = 2 ** (math.floor(math.log2(n - 1)) - 2)
    return -(-n // step) * step


def bucketed_lengths(prompt_len: int, answer_len: int) -> tuple[int, int]:
    """(prompt, answer) lengths of a batch whose longest prompt and answer have these lengths."""
    return bucket_length(prompt_len), bucket_length(answer_len)


def loss_weights(batch: Batch, loss: str, total_answer_tokens: int, batch_size: int) -> torch.Tensor:
    """Per answer position weights [B, A] float32 such that Σ weight ⊙ cross-entropy is this micro-batch's share of
    the step's loss: "mean_token" = mean over every answer token of the step; "first_plus_rest" = the mean loss of
    the first answer token plus the mean over the other answer tokens (the original's loss)."""
    mask = batch.answer_mask.to(torch.float64)
    if loss == "mean_token":
        w = mask / total_answer_tokens
    elif loss == "first_plus_rest":
        n_rest = total_answer_tokens - batch_size
        w = mask / n_rest if n_rest > 0 else torch.zeros_like(mask)
        w[:, 0] = 1.0 / batch_size
    else:
        raise ValueError(f"unknown loss {loss!r}")
    return w.to(torch.float32)


@dataclass
class StepInputs:
    """The tensors of one micro-batch a step reads; a captured graph owns one set and gets each batch copied in."""

    prompt: torch.Tensor  # [B, P] token ids, left-padded
    pad_left: torch.Tensor  # [B]
    answer_in: torch.Tensor  # [B, A - 1] answer-pass inputs
    answer: torch.Tensor  # [B, A] targets
    weight: torch.Tensor  # [B, A] float32 loss weights (0 at padding)

    @classmethod
    def of(cls, batch: Batch, weight: torch.Tensor) -> "StepInputs":
        return cls(batch.prompt, batch.pad_left, batch.answer_in, batch.answer, weight.to(batch.prompt.device))

    @property
    def shape_key(self) -> tuple[int, int, int]:
        return (self.prompt.shape[0], self.prompt.shape[1], self.answer.shape[1])

    def clone(self) -> "StepInputs":
        return StepInputs(*(t.clone() for t in self.tensors()))

    def copy_from(self, other: "StepInputs") -> None:
        for mine, theirs in zip(self.tensors(), other.tensors()):
            mine.copy_(theirs, non_blocking=True)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.prompt, self.pad_left, self.answer_in, self.answer, self.weight)


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    inputs: StepInputs
    loss: torch.Tensor


_SIDE_STREAMS: dict[int, "torch.cuda.Stream"] = {}


def side_stream() -> "torch.cuda.Stream":
    """One side stream per device for the whole process. cuBLAS keeps a workspace for every stream it has run on,
    for the life of the process: with a new stream per shape, a warm worker on an H100 held 96 MiB more after each
    gpu_demo run (288 MiB after three, when it retired); with one stream (and the workspaces let go between runs,
    worker/serve.py) a 32-run gpu_demo round ran in one process."""
    dev = torch.cuda.current_device()
    if dev not in _SIDE_STREAMS:
        _SIDE_STREAMS[dev] = torch.cuda.Stream(dev)
    return _SIDE_STREAMS[dev]


class FastStep:
    """Forward + loss + backward of micro-batches into persistent gradient buffers, eagerly or by graph replay.

    `begin()` starts a step (zeroes the gradients), `micro(inputs)` adds one micro-batch's gradients and returns its
    loss as a 0-dim tensor on the device (no host sync). `params` are the leaves that get gradients (model and FS
    gates); `autocast_dtype` None runs in float32. Several FastSteps (the benchmark's configurations) may share one
    `pool`: what holds for graphs of one FastStep holds across them, as long as one runs at a time."""

    def __init__(self, model, params: list[torch.Tensor], fs=None, gates=None,
                 autocast_dtype: torch.dtype | None = torch.bfloat16, graphs: bool = True,
                 max_graphs: int = MAX_GRAPHS, pool=None):
        self.model, self.fs, self.gates = model, fs, gates
        self.params = [p for p in params if p.requires_grad]
        self.autocast_dtype = autocast_dtype
        self.graphs_enabled = graphs
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.pool = pool  # a graph memory pool (torch.cuda.graph_pool_handle()) shared with other FastSteps, or None
        self.grads: list[torch.Tensor] | None = None
        self.captures = 0  # graphs recorded (a new shape, or one evicted and met again)
        self.replays = 0

    # a step ---------------------------------------------------------------------------------------------------------
    def begin(self) -> None:
        """Start a step: every parameter's gradient buffer holds zeros (created on the first step)."""
        if self.grads is None:
            self.grads = [torch.zeros_like(p) for p in self.params]
        else:
            torch._foreach_zero_(self.grads)
        for p, g in zip(self.params, self.grads):
            p.grad = g

    def micro(self, inputs: StepInputs) -> torch.Tensor:
        """Add one micro-batch's gradients; its loss (a 0-dim float32 tensor on the device)."""
        if self.grads is None:
            raise RuntimeError("FastStep.micro called before begin()")
        for p, g in zip(self.params, self.grads):
            if p.grad is not g:  # the optimizer, clipping or a caller replaced a buffer the graphs write into
                raise RuntimeError("a parameter's .grad is not the step's gradient buffer; call begin() first")
        if not self.graphs_enabled:
            return self.forward_backward(inputs)
        key = inputs.shape_key
        entry = self.graphs.get(key)
        if entry is None:
            loss = self._run_on_side_stream(inputs)
            self._capture(key, inputs)
            return loss
        self.graphs.move_to_end(key)
        entry.inputs.copy_from(inputs)
        entry.graph.replay()
        self.replays += 1
        return entry.loss.clone()

    def forward_backward(self, inputs: StepInputs) -> torch.Tensor:
        """What a graph records: both passes, the weighted token cross-entropy, and the backward."""
        autocast = (torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=False)
                    if self.autocast_dtype is not None else nullcontext())
        with autocast:
            logits, _ = forward_answer_logits(self.model, inputs, self.fs, self.gates, self.fs is not None,
                                              one_variant=True)
        V = logits.shape[-1]
        ce = F.cross_entropy(logits.float().reshape(-1, V), inputs.answer.reshape(-1), reduction="none")
        loss = (ce.view_as(inputs.weight) * inputs.weight).sum()
        loss.backward()
        return loss.detach()

    # graphs ---------------------------------------------------------------------------------------------------------
    def _run_on_side_stream(self, inputs: StepInputs) -> torch.Tensor:
        """An eager micro-step on a side stream, as CUDA graph capture wants of the work before it (lazy
        initialisations, compiling and autotuning happen here, outside any capture)."""
        side = side_stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loss = self.forward_backward(inputs)
        torch.cuda.current_stream().wait_stream(side)
        return loss

    def _capture(self, key: tuple, inputs: StepInputs) -> None:
        if len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
        static = inputs.clone()
        graph, loss = self._record(static)
        self.graphs[key] = _Graph(graph, static, loss)
        self.captures += 1

    def _record(self, static: StepInputs) -> tuple["torch.cuda.CUDAGraph", torch.Tensor]:
        """A CUDA graph of forward_backward on `static` (recorded, not run), and the tensor its loss lands in."""
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the eager step's cached blocks go back, so that the graph's pool can use them
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            loss = self.forward_backward(static)
        if self.pool is None:
            self.pool = graph.pool()
        return graph, loss
