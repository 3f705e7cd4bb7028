"""Whole optimizer steps as CUDA graphs (``performance.step_graphs``): for the small, launch-bound 32 px models.

One D step of the study's 32 px models (every micro-batch's forward and backward, Adam) is some 270 kernels, its
G step some 480 (operations dispatched, counted on the CPU), of a few microseconds each; launched one by one from
Python, the launches cost more than the arithmetic. Here D's step and G's step are each captured once as a CUDA
graph and then replayed: one launch per step.

What stays outside the graphs, eager as before: the latents and DiffAugment's draws (seeded generators, made
per phase), the data, SR between D steps, the EMA, the logging. The graphs read their inputs from static
buffers that each call refills, and the learning rate from a device tensor that the schedule fills in place
(a Python float would be frozen into the graph), so a replay does what an eager call with the same inputs
does. Each step sets its gradients to None first, as PyTorch's whole-network capture recipe does: the capture
allocates them in the graphs' pool, and each replay rewrites them there (no zeroing or accumulating kernels).
Between steps a parameter's ``.grad`` may therefore hold the other graph's scratch memory, not its last
gradient: nothing outside a step may read it (nothing does: SR, the EMA, logging and snapshots use weights).
Weights, optimizer states and SN's vectors are updated in place, and SR edits the weights in place: nothing else
a graph reads is ever rebound. The first calls of each step run eagerly, on a side stream, as CUDA's capture requires
(cuDNN/cuBLAS handles, the optimizer state's allocation); they are real training steps, so the sequence of
updates is that of an eager run. The graph is then recorded without running, and replayed at once.

The graphs share one memory pool (they replay one after the other on one stream). On a GPU Adam runs in its
capturable form, which computes the bias corrections on the device: the same update to float rounding, not bit
for bit. Without CUDA (a CPU) the same code runs without capture: the static buffers and the step functions are
those the GPU uses, so the tests here check all but the capture and the capturable Adam.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils import _pytree as pytree

from source.config import first_line

EAGER_CALLS = 3  # before capture, per step (PyTorch's recipe: a few warm-up iterations on a side stream)


class StepGraphError(RuntimeError):
    """A step could not be captured (an operation CUDA graphs do not allow); training stops with one line."""


@dataclass
class _Step:
    inputs: object  # the static buffers, in the structure of the step's inputs
    calls: int = 0
    graph: torch.cuda.CUDAGraph | None = None
    output: torch.Tensor | None = None


class StepGraphs:
    def __init__(self, device: torch.device):
        self.device = device
        self.capture = device.type == "cuda"
        self.steps: dict[str, _Step] = {}
        self.side_stream: torch.cuda.Stream | None = None  # the warm-up calls' (one: each stream keeps workspaces)
        self.pool = None  # the graphs' memory, shared: they replay one after another on one stream

    def run(self, name: str, update: Callable[[object], torch.Tensor], inputs) -> torch.Tensor:
        """``update(inputs)`` for step ``name``: eagerly for its first calls, then as its graph's replay."""
        step = self._load(name, inputs)
        if not self.capture:
            return update(step.inputs)
        with torch.cuda.device(self.device):  # the run's device: the capture and the side stream are on it
            return self._captured(name, step, update)

    def _captured(self, name: str, step: _Step, update: Callable[[object], torch.Tensor]) -> torch.Tensor:
        if step.calls < EAGER_CALLS:
            step.calls += 1
            return self._on_side_stream(lambda: update(step.inputs))
        if step.graph is None:
            graph = torch.cuda.CUDAGraph()
            try:  # records, does not run: the replay below does; other threads (a loader's) may use CUDA meanwhile
                _fresh_cublas_workspaces()
                with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                    step.output = update(step.inputs)
                _fresh_cublas_workspaces()
            except torch.OutOfMemoryError:
                raise  # not the capture's fault
            except RuntimeError as error:
                raise StepGraphError(f"step graphs: capturing the {name} step failed ({first_line(error)}); the "
                                     f"snapshots so far are intact: resume without performance.step_graphs") from error
            step.graph, self.pool = graph, self.pool or graph.pool()
        step.graph.replay()
        return step.output.clone()  # the next replay rewrites the graph's output

    def _on_side_stream(self, call: Callable[[], torch.Tensor]) -> torch.Tensor:
        self.side_stream = self.side_stream or torch.cuda.Stream(self.device)
        self.side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side_stream):
            output = call()
        torch.cuda.current_stream().wait_stream(self.side_stream)
        return output

    def _load(self, name: str, inputs) -> _Step:
        """The step's static buffers, holding a copy of ``inputs`` (made at its first call; None stays None)."""
        if name not in self.steps:
            self.steps[name] = _Step(pytree.tree_map_only(torch.Tensor, torch.clone, inputs))
            return self.steps[name]
        step = self.steps[name]
        buffers, spec = pytree.tree_flatten(step.inputs)
        values, given = pytree.tree_flatten(inputs)
        if given != spec or any(_layout(b) != _layout(v) for b, v in zip(buffers, values)):
            raise ValueError(f"step graphs: the {name} step's inputs changed their structure or shapes; a graph "
                             f"replays fixed shapes")
        for buffer, value in zip(buffers, values):
            if buffer is not None:
                buffer.copy_(value, non_blocking=True)
        return step


def _fresh_cublas_workspaces() -> None:
    """cuBLAS keeps one workspace per (handle, stream), and every capture of a process runs on one stream
    (``torch.cuda.graph``'s default): without this, the graphs of several runs in one process (``train.py --group``)
    would all bake in the same workspace and, replayed at once on their runs' streams, write it together. Cleared
    before a capture, cuBLAS allocates the graph its own, in the graph's pool; cleared after, nothing eager uses that
    one (what inductor does around its CUDA graphs)."""
    torch._C._cuda_clearCublasWorkspaces()


def _layout(value) -> tuple | None:
    return None if value is None else (value.shape, value.dtype, value.device)
