"""K runs of the collapse study's model stacked into one: whether K runs sharing every kernel train faster per run.

    python -m benchmarks.gpu.stacked [--quick] [--out DIR] [--runs 4,12,36]   # on the device machine: --out $OUT

The collapse study trains dozens of seeds of one small model (configs/collapse/fmnist_cifar_recipe_ch32.yaml: ch 32,
32 px, unconditional). On the H200 its kernels, not their launches, set the pace once steps ran as CUDA graphs: the
GPU was busy 13.8 of 16.5 ms per G-iteration, in some 2300 kernels of a few microseconds each (section (d)), too
small to fill the device. K runs stacked into one model (``stacking.stack``: grouped convs, batched linears, one
BatchNorm over the runs' channels, SN's power steps batched) launch each kernel once for all K.

Measured side by side on the same K models (seeds 0..K-1) and inputs: one G-iteration of the study's recipe (n_dis
5 D steps on 64 real + 64 fake, hinge loss, one G step of 128 in 2 micro-batches, SN's power step on the first of
each step's micro-batches, Adam with betas (0, 0.9)) for the K models one after another and for their stack; on a
GPU one CUDA graph per G-iteration with fused, capturable Adam (as step graphs run the study), eager on a CPU.
Recorded: ms per G-iteration of all K runs, G-iterations/s per run, the stack's speed-up, and how far the stack's
warm-up losses strayed from the separate runs' (the same function to rounding; a test checks outputs, gradients,
SN's vectors and G-iterations on the CPU). A measurement before building: the study's runner trains separate runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import _SpectralNorm

from benchmarks.gpu.common import ROOT, device_name, environment, in_own_process, pick_device, progress, slug
from benchmarks.gpu.stacking import StackedSpectralNorm, stack
from source.config import load_config
from source.files import atomic_write_text
from source.links import no_power_iteration
from source.models import build_model

STUDY_CONFIG = ROOT / "configs/collapse/fmnist_cifar_recipe_ch32.yaml"
RUNS = {False: (4, 12, 36), True: (2,)}  # K: 12 = the study's starting runs of one setting, 36 = all its runs
RECIPE = {False: {"batch": 64, "gen_batch": 128, "micro": 64, "n_dis": 5},
          True: {"batch": 8, "gen_batch": 16, "micro": 8, "n_dis": 2}}
SPECTRAL_NORMS = (_SpectralNorm, StackedSpectralNorm)  # the separate models' and the stack's
WARMUP = 3  # eager G-iterations before a capture (and the agreement's), as PyTorch's recipe warms up


class Pair:
    """One G and D trained by the study's recipe (``recipe``: batch, gen_batch, micro, n_dis); on a stack every loss
    is the runs' sum, each run's gradient its own. ``part`` takes this pair's inputs from (batch, K, ...) draws."""

    def __init__(self, gen: nn.Module, dis: nn.Module, part, recipe: dict):
        self.gen, self.dis, self.part, self.recipe = gen, dis, part, recipe
        device = next(gen.parameters()).device
        fast = {"fused": True, "capturable": True} if device.type == "cuda" else {"foreach": True}
        self.opt_gen, self.opt_dis = (torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.0, 0.9), **fast)
                                      for model in (gen, dis))

    def dis_step(self, z: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        self.opt_dis.zero_grad(set_to_none=False)
        with torch.no_grad():
            fake = self.gen(self.part(z))
        logits_real, logits_fake = self.dis(torch.cat([self.part(real), fake])).chunk(2)
        losses = F.relu(1 - logits_real).mean(0) + F.relu(1 + logits_fake).mean(0)  # (K,) on a stack, per run
        losses.sum().backward()
        self.opt_dis.step()
        return losses.detach().reshape(-1)

    def gen_step(self, zs: list[torch.Tensor]) -> None:
        self.opt_gen.zero_grad(set_to_none=False)
        self.dis.requires_grad_(False)
        for micro, z in enumerate(zs):
            with no_power_iteration(self.dis, kinds=SPECTRAL_NORMS) if micro else nullcontext():
                (-self.dis(self.gen(self.part(z))).mean(0).sum() / len(zs)).backward()
        self.dis.requires_grad_(True)
        self.opt_gen.step()


def g_iteration(pairs: list[Pair], real: torch.Tensor, dim_z: int, runs: int) -> torch.Tensor:
    """One G-iteration of every pair on the same draws (z as (batch, K, dim_z)); the D steps' losses, per run."""
    recipe, losses = pairs[0].recipe, []
    for _ in range(recipe["n_dis"]):
        z = torch.randn(recipe["batch"], runs, dim_z, device=real.device, dtype=real.dtype)
        losses.append(torch.cat([pair.dis_step(z, real) for pair in pairs]))
    zs = [torch.randn(recipe["micro"], runs, dim_z, device=real.device, dtype=real.dtype)
          for _ in range(recipe["gen_batch"] // recipe["micro"])]
    for pair in pairs:
        pair.gen_step(zs)
    return torch.stack(losses)


def study_models(runs: int, quick: bool, device: torch.device) -> list[tuple[nn.Module, nn.Module]]:
    """The study's G and D (ch 8 with --quick) for seeds 0..runs-1."""
    overrides = ["models.generator.args.ch=8", "models.discriminator.args.ch=8"] if quick else []
    config = load_config(STUDY_CONFIG, overrides)
    models = []
    for seed in range(runs):
        torch.manual_seed(seed)
        models.append(tuple(build_model(spec.name, spec.args).to(device).train()
                            for spec in (config.models.generator, config.models.discriminator)))
    return models


def prepared(pairs: list[Pair], real: torch.Tensor, dim_z: int, runs: int, graph: bool) -> tuple:
    """(one G-iteration as a callable: a replay of its CUDA graph, or eager; the warm-up's D losses)."""
    torch.manual_seed(1234)  # the same draws for the separate runs and the stack
    if not graph:
        warmup = torch.stack([g_iteration(pairs, real, dim_z, runs) for _ in range(WARMUP)])
        return (lambda: g_iteration(pairs, real, dim_z, runs)), warmup
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the leaves' first use, as capture requires
        warmup = torch.stack([g_iteration(pairs, real, dim_z, runs) for _ in range(WARMUP)])
    torch.cuda.current_stream().wait_stream(side)
    recorded = torch.cuda.CUDAGraph()
    with torch.cuda.graph(recorded):
        g_iteration(pairs, real, dim_z, runs)

    def replay(held=(pairs, real)):  # the graph reads and writes their memory: they live while it replays
        recorded.replay()
    replay()
    return replay, warmup


def seconds(step, repeats: int, device: torch.device) -> float:
    """Per call of ``step``, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured(runs: int, quick: bool, device: torch.device, timing: dict, graph: bool, isolate: bool) -> dict:
    """``compare``'s row for K runs, in CUDA graphs where ``graph``, eager where a capture fails (the row says
    why); with ``isolate`` each attempt in a process of its own: a failed capture leaves torch's CUDA state unusable
    (the generator still capturing, the capture stream current), for the eager attempt and every later K."""
    def call(graphed: bool) -> dict:
        arguments = (runs, quick, device, timing, graphed)
        return in_own_process(compare, *arguments) if isolate else compare(*arguments)
    row = call(graph)
    return {**call(False), "graph_error": row["graph_error"]} if "graph_error" in row else row


def compare(runs: int, quick: bool, device: torch.device, timing: dict, graph: bool) -> dict:
    """The K models one after another against their stack, side by side (in CUDA graphs where ``graph``):
    ``timing``'s rounds of each in turn (a load that comes and goes then meets both), medians; a failed capture
    is returned as ``graph_error``, with the error that caused it."""
    torch.backends.cudnn.benchmark = True
    if device.type == "cuda":  # the study's arithmetic: fp32 without TF32
        torch.backends.cudnn.conv.fp32_precision = torch.backends.cuda.matmul.fp32_precision = "ieee"
    try:
        steps = prepare_both(runs, quick, device, graph)
    except RuntimeError as error:
        if not graph:
            raise
        cause = f" (after {type(error.__context__).__name__}: {first(error.__context__)})" if error.__context__ else ""
        return {"runs": runs, "graph_error": f"{type(error).__name__}: {first(error)}{cause}"}
    repeats = max(1, timing["run_iterations_per_round"] // runs)  # each round about as long whatever K
    rounds = [[seconds(step, repeats, device) for step, _ in steps] for _ in range(timing["rounds"])]
    separate_s, stacked_s = (statistics.median(column) for column in zip(*rounds))
    (_, separate_losses), (_, stacked_losses) = steps
    strayed = (stacked_losses - separate_losses).abs().amax(dim=(1, 2)) / separate_losses.abs().amax().clamp_min(1)
    return {"runs": runs, "timing": "CUDA graph replays" if graph else "eager", "repeats_per_round": repeats,
            "separate_ms": round(1e3 * separate_s, 3), "stacked_ms": round(1e3 * stacked_s, 3),
            "separate_g_iterations_per_s_per_run": round(1 / separate_s, 2),
            "stacked_g_iterations_per_s_per_run": round(1 / stacked_s, 2),
            "separate_g_iterations_per_s_total": round(runs / separate_s, 1),
            "stacked_g_iterations_per_s_total": round(runs / stacked_s, 1),
            "stacked_speedup": round(separate_s / stacked_s, 3),
            "rounds_ms": [[round(1e3 * value, 3) for value in pair] for pair in rounds],
            "warmup_losses_difference": [float(value) for value in strayed]}


def prepare_both(runs: int, quick: bool, device: torch.device, graph: bool) -> list:
    """[prepared(...) of the K models one after another, of their stack], from fresh models."""
    recipe = RECIPE[quick]
    models = study_models(runs, quick, device)
    gen_stack, dis_stack = (stack([pair[i] for pair in models]) for i in (0, 1))
    dim_z, image = models[0][0].dim_z, models[0][1].block1.c1.in_channels
    real = torch.rand(recipe["batch"], runs, image, 32, 32, device=device) * 2 - 1
    separate = [Pair(gen, dis, lambda t, k=k: t[:, k], recipe) for k, (gen, dis) in enumerate(models)]
    stacked = [Pair(gen_stack, dis_stack, lambda t: t.flatten(1, 2), recipe)]
    return [prepared(pairs, real, dim_z, runs, graph) for pairs in (separate, stacked)]


def run(quick: bool, device: torch.device, runs: tuple[int, ...], save) -> dict:
    # per round and variant, G-iterations summed over the K runs: each round repeats 40 // K G-iterations of all K
    # (about 0.6 s of a GPU at the H200's 16 ms per separate run's G-iteration), so K = 36 costs what K = 4 does
    timing = {"rounds": 1 if quick else 5 if device.type == "cuda" else 3,
              "run_iterations_per_round": 40 if device.type == "cuda" and not quick else 1}
    result = {"what": __doc__.splitlines()[0], "quick": quick, "environment": environment(device),
              "recipe": RECIPE[quick], "timing": timing, "warmup_iterations": WARMUP,
              "difference": "warm-up D losses, stack against separate runs, per G-iteration: the largest difference "
                            "relative to max(|loss|, 1)", "by_runs": []}
    cuda = device.type == "cuda"
    for count in runs:
        try:
            result["by_runs"].append(measured(count, quick, device, timing, graph=cuda, isolate=cuda))
        except Exception as error:  # e.g. out of memory at K runs: the smaller Ks' numbers stay
            result["by_runs"].append({"runs": count, "error": f"{type(error).__name__}: {first(error)}"})
        save(result)
        progress("stacked", f"{count} runs: {result['by_runs'][-1]}")
    return result


def first(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ch 8, batch 8, 2 runs (the test)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    parser.add_argument("--runs", help="K values, comma-separated (default 4,12,36; --quick: 2)")
    args = parser.parse_args(argv)
    runs = tuple(int(value) for value in args.runs.split(",")) if args.runs else RUNS[args.quick]
    device = pick_device()
    path = args.out / f"stacked_{slug(device_name(device))}{'-quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    run(args.quick, device, runs, lambda so_far: atomic_write_text(path, json.dumps(so_far, indent=2) + "\n"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
