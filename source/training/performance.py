"""How the arithmetic runs: mixed precision, memory layout, compilation, TF32 and cuDNN autotuning.

These settings never change the recipe: the batch, the steps and their order stay. What
they change is stated with each option in ``PerformanceConfig``; SN's power iteration
(``FP32SpectralNorm``), SR, the losses and the optimizer states stay in fp32 (fp64 for SR's SVDs)
whatever ``amp`` is.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from source.config import PerformanceConfig

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def configure_backends(settings: PerformanceConfig, deterministic: bool) -> None:
    """TF32 for fp32 matmuls and convs (the originals had none) and cuDNN autotuning (fixed shapes)."""
    precision = "tf32" if settings.tf32 else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision
    torch.backends.cudnn.benchmark = settings.cudnn_benchmark and not deterministic


def autocast(settings: PerformanceConfig, device: torch.device) -> AbstractContextManager:
    """The forward passes of G and D run under this; losses are computed outside it, in fp32."""
    if settings.amp == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[settings.amp])


def grad_scaler(settings: PerformanceConfig, device: torch.device) -> torch.amp.GradScaler:
    """fp16 gradients underflow without loss scaling; a disabled scaler is a no-op (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=settings.amp == "fp16")


def compiled_graphs(settings: PerformanceConfig) -> bool:
    """G's and D's compiled forwards and backwards run as CUDA graphs of their own: compile modes reduce-overhead
    and max-autotune (on a CPU they run without graphs)."""
    return settings.compile and settings.compile_mode != "default"


def zero_grad(optimizer: torch.optim.Optimizer, stable: bool) -> None:
    """No gradients before a step: None, or (``stable``) zeroed buffers that outlive compile's CUDA graphs, which
    reuse their outputs' memory at the next replay (0 + g is g, so both give the same sums)."""
    if not stable:
        optimizer.zero_grad(set_to_none=True)
        return
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    torch._foreach_zero_([p.grad for p in parameters])  # a few launches, not one per parameter


def memory_format(settings: PerformanceConfig) -> torch.memory_format:
    return torch.channels_last if settings.channels_last else torch.contiguous_format


def prepare_model(model: nn.Module, settings: PerformanceConfig) -> nn.Module:
    """Layout and compilation, in place: state_dict keys (and so snapshots) stay those of the plain model."""
    model.to(memory_format=memory_format(settings))
    if settings.compile:
        model.compile(mode=settings.compile_mode)
    return model
