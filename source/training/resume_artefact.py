"""The SRGANs resume artefact, reproduced on request (``updater.resume_artefact``; docs/reference/srgan.md §5.3).

The original ran its 4 GPUs as a main model and 3 replicas deep-copied *before* the snapshot was
loaded, so in the first iteration after every resume the replicas still held the initial random G and D:
48 of that iteration's 64 micro-batch gradients came from random-init models and were summed into the
main models' (Chainer's ``addgrads``), and SR's first, record-only call (its envelope was never saved)
followed that update; D's replicas were synced after D's update and SR, G's after G's. Here, in that first iteration, every batch of samples is cut into ``devices`` equal
parts and parts 1.. go through fresh copies of the initial G and D (the run's own initialisation, from its
seed); their gradients are added into the main models' before each optimizer step, then dropped. The
first iteration's losses mix the replicas' too, as the original's reports did. One process only. Unlike the
original (32 samples per GPU), G's BatchNorm in that iteration normalizes over each device's part of the
micro-batch (micro_batchsize / devices samples, or the run's ghost groups when they fit in it).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from source.links.conditional_batchnorm import set_ghost_batch


def routed(models: list[nn.Module], inputs: torch.Tensor, labels: torch.Tensor | None, halves: int) -> torch.Tensor:
    """Each of ``halves`` equal halves of ``inputs`` (D's [real; fake] batch: 2) is cut into one part per model;
    model d gets part d of every half in one call (one SN power step, as one forward); outputs in input order."""
    parts = halves * len(models)
    chunks = inputs.chunk(parts)
    label_chunks = labels.chunk(parts) if labels is not None else [None] * parts
    if len(chunks) != parts or len({len(c) for c in chunks}) != 1:
        raise ValueError(f"a batch of {len(inputs)} does not split into {parts} equal parts")
    outputs: list[torch.Tensor | None] = [None] * parts
    for d, model in enumerate(models):
        own = list(range(d, parts, len(models)))
        y = None if labels is None else torch.cat([label_chunks[c] for c in own])
        # eager even where the run compiles: the parts' batch size would recompile the main model with a dynamic
        # batch for the rest of the run (_call_impl is nn.Module's uncompiled call, hooks included)
        for c, out in zip(own, model._call_impl(torch.cat([chunks[c] for c in own]), y).chunk(halves)):
            outputs[c] = out
    return torch.cat(outputs)


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy that runs eagerly in training mode: the copy of a module compiled in place
    (``performance.compile``) would keep calling the original's compiled forward, so the copy drops it; the
    replicas live for one iteration, not worth compiling."""
    replica = copy.deepcopy(model).train()
    replica._compiled_call_impl = None  # nn.Module.compile's wrapper; recent torch drops it on copy, older kept it
    return replica


class ResumeArtefact:
    """Fresh replicas of G and D for one iteration: ``devices - 1`` copies of each initial model."""

    def __init__(self, initial_gen: nn.Module, initial_dis: nn.Module, devices: int = 4, bn_batch: int | None = None):
        if devices < 2:
            raise ValueError(f"the resume artefact needs at least 2 devices (a main model and a replica), got {devices}")
        self.devices = devices
        self.bn_batch = bn_batch  # G's ghost BatchNorm groups in the run
        self.synced: set[str] = set()
        self.replicas = {"gen": [plain_copy(initial_gen) for _ in range(devices - 1)],
                         "dis": [plain_copy(initial_dis) for _ in range(devices - 1)]}

    def generate(self, gen: nn.Module, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """G's samples, each device's part from its own G; BatchNorm over each device's part as on the original's
        GPUs, unless the run's ghost groups fit in it."""
        models = [gen, *self.replicas["gen"]]
        part = len(z) // self.devices
        for model in models:
            set_ghost_batch(model, self.bn_batch if self.bn_batch and part % self.bn_batch == 0 else None)
        try:
            return routed(models, z, labels, halves=1)
        finally:
            set_ghost_batch(gen, self.bn_batch)

    def discriminate(self, dis: nn.Module, images: torch.Tensor, labels: torch.Tensor | None,
                     halves: int) -> torch.Tensor:
        return routed([dis, *self.replicas["dis"]], images, labels, halves)

    @torch.no_grad()
    def add_gradients(self, main: nn.Module, which: str) -> None:
        """Chainer's addgrads: every ``which`` ("gen"/"dis") replica's gradients into ``main``'s, then dropped,
        with those the other network's replicas got on the way (D's replicas in G's step)."""
        for replica in self.replicas[which]:
            for target, source in zip(main.parameters(), replica.parameters()):
                if source.grad is not None:
                    target.grad = source.grad.clone() if target.grad is None else target.grad.add_(source.grad)
        for replica in self.replicas["gen"] + self.replicas["dis"]:
            replica.zero_grad(set_to_none=True)

    def sync(self, main: nn.Module, which: str) -> bool:
        """After ``which``'s first optimizer step its replicas take its weights (Chainer's copyparams); True once
        both networks are synced: the artefact is over (D's replicas are synced before G's step, as there)."""
        for replica in self.replicas[which]:
            replica.load_state_dict(main.state_dict())
        self.synced.add(which)
        return self.synced == {"gen", "dis"}
