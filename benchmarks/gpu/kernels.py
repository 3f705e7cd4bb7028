"""Kernel alternatives for the launch-bound 32 px models, timed side by side where step graphs run them.

    python -m benchmarks.gpu.kernels [--quick] [--out DIR]      # on the device machine: --out $OUT, ~20 s

The H200's step-graphs profile of the collapse study's model (benchmarks/results/gpu_nvidia-h200.json, section (d))
spent 0.70 ms per G-iteration in 23 calls of CUDA's ``avg_pool2d`` backward and 0.56 ms in 12 of nearest
up-sampling's backward, some 10x the time their memory traffic needs, and about half of its ~3000 kernels were
spectral norm's power steps on tiny vectors. Before the models change, this measures the candidates on the GPU:
- 2x2 average pooling as a mean over a reshaped view, and nearest x2 up-sampling as an expanded view, forward and
  backward, against torch's kernels, at the study's shapes and the 128 px models' (the same values to the rounding
  of a 4-term sum: pooling's forward, up-sampling's backward);
- one power step of every SN layer of the study's D, layer by layer (``FP32SpectralNorm._power_step``), against
  the layers of one weight shape stacked into batched products (the same u, v and sigma to rounding).
- the study's 3x3 convs of K runs (forward and both gradients): K separate convs, one after another as runs sharing
  a stream issue them, against one grouped conv (groups = K over the runs' channels side by side), which is what
  training K seeds as one stacked model would launch (the same values to rounding), in NCHW and in channels_last
  (cuDNN picks other kernels by layout, and grouped convs have been reported slower than separate ones:
  pytorch/pytorch#70954, #73764): whether the convs of these small models get cheaper per run when K runs share
  each kernel (fp32 without TF32, the study's arithmetic).
On a GPU each case is captured once as a CUDA graph and replayed (as step graphs run it), timed with CUDA events;
on a CPU it runs eagerly. Writes ``kernels_<device>.json`` into --out after every case (the committed copies:
benchmarks/results/): a call cut short keeps the cases it finished; a shape or case that fails records its error.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.gpu.common import ROOT, device_name, environment, in_own_process, pick_device, progress, slug
from benchmarks.gpu.stacking import batched_power_step
from source.config import load_config
from source.files import atomic_write_text
from source.models import build_model
from source.spectral.spectra import raw_weight, spectral_norm_layers, spectral_norm_of

STUDY_CONFIG = ROOT / "configs/collapse/fmnist_cifar_recipe_ch32.yaml"
# (batch, channels, height, width) of the inputs: the study's D pools 32 -> 16 -> 8 (64 real + 64 fake), its G
# up-samples 4 -> 8 -> 16 (micro-batch 64); the 128 px models' at micro-batch 32
POOL_SHAPES = {False: [(128, 32, 32, 32), (128, 32, 16, 16), (32, 64, 128, 128), (32, 256, 32, 32)],
               True: [(4, 2, 8, 8)]}
# (batch, channels, side) at the study's 3x3 convs: D's at 32, 16 and 8 px on 64 real + 64 fake, G's at 8, 16, 32 on 64
CONV_SHAPES = {False: [(128, 32, 32), (128, 32, 16), (128, 32, 8), (64, 32, 8), (64, 32, 16), (64, 32, 32)],
               True: [(4, 2, 8)]}
STACKED_RUNS = {False: (4, 12), True: (2,)}  # K: 12 = the study's starting runs of one setting
UPSAMPLE_SHAPES = {False: [(64, 32, 4, 4), (64, 32, 8, 8), (64, 32, 16, 16), (32, 1024, 8, 8), (32, 128, 64, 64)],
                   True: [(4, 2, 4, 4)]}


def pool_native(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 2)


def pool_reshaped(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, c, h // 2, 2, w // 2, 2).mean(dim=(3, 5))


def upsample_native(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


def upsample_expanded(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    return x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)


def forward_backward(function, x: torch.Tensor, grad: torch.Tensor):
    """The function's output and its input's gradient (what one use inside a training step costs), on a leaf of its
    own: autograd ties a leaf to the stream of its first use, and a leaf first used on the default stream breaks a
    later CUDA graph capture of its backward (the H200's first run of this script)."""
    leaf = x.detach().requires_grad_()

    def step():
        y = function(leaf)
        return y, torch.autograd.grad(y, leaf, grad)[0]
    return step


def microseconds(step, device: torch.device, repeats: int) -> float:
    """Per call: replays of a CUDA graph of ``step`` on a GPU (warmed up on a side stream first), eager on a CPU."""
    if device.type != "cuda":
        step()
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        return 1e6 * (time.perf_counter() - start) / repeats
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1e3 * begin.elapsed_time(end) / repeats


def compare(native, candidate, shapes: list[tuple], device: torch.device, repeats: int) -> list[dict]:
    return [guarded(compare_at, native, candidate, shape, device, repeats) for shape in shapes]


def compare_at(native, candidate, shape: tuple, device: torch.device, repeats: int) -> dict:
    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn(shape, device=device, generator=generator)
    grad = torch.randn(native(x).shape, device=device, generator=generator)
    (y_native, g_native), (y_candidate, g_candidate) = (forward_backward(f, x, grad)() for f in (native, candidate))
    times = [microseconds(forward_backward(f, x, grad), device, repeats) for f in (native, candidate)]
    return {"shape": list(shape), "native_us": round(times[0], 2), "candidate_us": round(times[1], 2),
            "candidate_over_native": round(times[1] / times[0], 3),
            "output_max_difference": float((y_native - y_candidate).detach().abs().max()),
            "gradient_max_difference": float((g_native - g_candidate).abs().max())}


def study_discriminator(device: torch.device, quick: bool) -> tuple[list, list[torch.Tensor]]:
    """The SN parametrizations of the study's D (ch 8 with --quick) and their raw weights as matrices."""
    config = load_config(STUDY_CONFIG, ["models.discriminator.args.ch=8"] if quick else [])
    spec = config.models.discriminator
    dis = build_model(spec.name, spec.args).to(device).train()
    layers = spectral_norm_layers(dis).values()
    return ([spectral_norm_of(layer) for layer in layers],
            [spectral_norm_of(layer)._reshape_weight_to_matrix(raw_weight(layer)).detach() for layer in layers])


def power_steps_layer_by_layer(layers: list, matrices: list[torch.Tensor]) -> list[torch.Tensor]:
    return [sn._power_step(matrix) for sn, matrix in zip(layers, matrices)]


class StackedPowerSteps:
    """The same steps with the layers of one weight shape stacked into batched products, their u and v held stacked
    (in a model built so, each layer's buffers would be views into these): u = W v / |W v|, v = W^T u / |W^T u|,
    sigma = |W^T u|. Only the weights are stacked per call (a copy: they are separate parameters)."""

    def __init__(self, layers: list, matrices: list[torch.Tensor]):
        groups = defaultdict(list)
        for index, matrix in enumerate(matrices):
            groups[tuple(matrix.shape)].append(index)
        self.groups = list(groups.values())
        self.eps = layers[0].eps
        self.u = [torch.stack([layers[i]._u for i in group]) for group in self.groups]
        self.v = [torch.stack([layers[i]._v for i in group]) for group in self.groups]

    def __call__(self, matrices: list[torch.Tensor]) -> list[torch.Tensor]:
        return [batched_power_step(torch.stack([matrices[i] for i in group]), u, v, self.eps)
                for group, u, v in zip(self.groups, self.u, self.v)]

    def values(self, sigmas: list[torch.Tensor], count: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(u, v, sigma) of each layer, in the layers' order."""
        found = [None] * count
        for group, u, v, sigma in zip(self.groups, self.u, self.v, sigmas):
            for row, index in enumerate(group):
                found[index] = (u[row], v[row], sigma[row, 0])
        return found


def sn_power_steps(device: torch.device, quick: bool, repeats: int) -> dict:
    layers, matrices = study_discriminator(device, quick)
    with torch.no_grad():
        stacked = StackedPowerSteps(layers, matrices)
        expected = [(sn._u, sn._v, sigma) for sn, sigma in zip(layers, power_steps_layer_by_layer(layers, matrices))]
        found = stacked.values(stacked(matrices), len(layers))
        difference = max(float((a - b).abs().max()) for mine, theirs in zip(found, expected)
                         for a, b in zip(mine, theirs))
        times = [microseconds(step, device, repeats) for step in
                 (lambda: power_steps_layer_by_layer(layers, matrices), lambda: stacked(matrices))]
    return {"layers": len(layers), "shapes": len(stacked.groups),
            "layer_by_layer_us": round(times[0], 2), "stacked_us": round(times[1], 2),
            "stacked_over_layer_by_layer": round(times[1] / times[0], 3), "max_difference": difference}


def stacked_convs(device: torch.device, quick: bool, repeats: int) -> list[dict]:
    """As the study runs them: fp32 without TF32 (which may be the default), cuDNN autotuned (in the warm-up)."""
    default = torch.backends.cudnn.conv.fp32_precision
    torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.benchmark = "ieee", True
    try:
        return [guarded(stacked_conv, shape, runs, device, repeats)
                for shape in CONV_SHAPES[quick] for runs in STACKED_RUNS[quick]]
    finally:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.benchmark = default, False


def stacked_conv(shape: tuple[int, int, int], runs: int, device: torch.device, repeats: int) -> dict:
    batch, channels, side = shape
    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, runs * channels, side, side, device=device, generator=generator)
    weight = torch.randn(runs * channels, channels, 3, 3, device=device, generator=generator) / (3 * channels)
    grad = torch.randn(x.shape, device=device, generator=generator)

    parts = [[part.contiguous() for part in whole.chunk(runs, dim)] for whole, dim in ((x, 1), (weight, 0), (grad, 1))]
    nhwc = [[t.contiguous(memory_format=torch.channels_last)] for t in (x, weight, grad)]  # cuDNN's other kernels

    def steps():  # fresh leaves for each use (see forward_backward); each run's tensors its own, as separate runs'
        return conv_step(*parts, 1), conv_step([x], [weight], [grad], runs), conv_step(*nhwc, runs)

    separate, *grouped = steps()
    expected = separate()
    difference = max(relative_difference(torch.cat(a, dim=d), torch.cat(b, dim=d))  # outputs, input and weight
                     for step in grouped for a, b, d in zip(step(), expected, (1, 1, 0)))  # gradients
    times = [microseconds(step, device, repeats) for step in steps()]
    return {"batch": batch, "channels_per_run": channels, "side": side, "runs": runs,
            "separate_us": round(times[0], 2), "grouped_us": round(times[1], 2),
            "grouped_channels_last_us": round(times[2], 2), "grouped_over_separate": round(times[1] / times[0], 3),
            "grouped_channels_last_over_separate": round(times[2] / times[0], 3), "max_relative_difference": difference}


def relative_difference(found: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest difference relative to the largest value: sums of 10^5 products differ in their last bits."""
    return float((found - expected).detach().abs().max() / expected.detach().abs().max())


def conv_step(inputs: list[torch.Tensor], weights: list[torch.Tensor], grads: list[torch.Tensor], groups: int):
    """3x3 convs of ``inputs`` by ``weights`` (pairwise) and their gradients: (outputs, input grads, weight grads),
    on leaves of its own."""
    inputs = [x.detach().requires_grad_() for x in inputs]
    weights = [w.detach().requires_grad_() for w in weights]

    def step():
        outputs = [F.conv2d(x, w, padding=1, groups=groups) for x, w in zip(inputs, weights)]
        found = torch.autograd.grad(outputs, inputs + weights, grads)
        return outputs, found[:len(inputs)], found[len(inputs):]
    return step


def pooling(device: torch.device, quick: bool, repeats: int) -> list[dict]:
    return compare(pool_native, pool_reshaped, POOL_SHAPES[quick], device, repeats)


def upsampling(device: torch.device, quick: bool, repeats: int) -> list[dict]:
    return compare(upsample_native, upsample_expanded, UPSAMPLE_SHAPES[quick], device, repeats)


CASES = {"avg_pool_2x2": pooling, "nearest_upsample_x2": upsampling,  # name: case(device, quick, repeats)
         "sn_power_steps_study_dis": sn_power_steps, "stacked_runs_conv3x3": stacked_convs}


def run(quick: bool, device: torch.device, save, isolate: bool | None = None) -> dict:
    """Every case in turn, on a GPU (``isolate``) each in a process of its own (a failed capture would spoil the
    cases after it); ``save(result so far)`` after each."""
    repeats = 3 if quick else 200 if device.type == "cuda" else 10
    isolate = device.type == "cuda" if isolate is None else isolate
    torch.backends.cudnn.benchmark = False  # also a spawned process's default
    result = {"what": __doc__.splitlines()[0], "quick": quick, "environment": environment(device), "repeats": repeats}
    for name, case in CASES.items():
        result[name] = guarded(in_own_process, case, device, quick, repeats) if isolate else \
            guarded(case, device, quick, repeats)
        save(result)
        progress("kernels", f"{name} done")
    return result


def guarded(case, *args):
    """Cases not yet run on a GPU: an error is recorded instead of losing the other cases' and shapes' numbers."""
    try:
        return case(*args)
    except Exception as error:  # e.g. cuDNN refusing a grouped conv inside a graph capture, or out of memory
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}


def ratios(rows, key: str):
    """``key`` of each row (a case's error, or a row's, in its place), for the summary line."""
    return rows.get("error") if isinstance(rows, dict) else [row.get(key, "error") for row in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 3 repeats (the test)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = parser.parse_args(argv)
    device = pick_device()
    path = args.out / f"kernels_{slug(device_name(device))}{'-quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = run(args.quick, device, lambda so_far: atomic_write_text(path, json.dumps(so_far, indent=2) + "\n"))
    steps = result["sn_power_steps_study_dis"]
    print(f"{path}: pooling {ratios(result['avg_pool_2x2'], 'candidate_over_native')}, up-sampling "
          f"{ratios(result['nearest_upsample_x2'], 'candidate_over_native')}, SN power steps "
          f"{steps.get('stacked_over_layer_by_layer', steps.get('error'))}, K runs' convs grouped "
          f"{ratios(result['stacked_runs_conv3x3'], 'grouped_over_separate')}, the same in channels_last "
          f"{ratios(result['stacked_runs_conv3x3'], 'grouped_channels_last_over_separate')} (candidate / native time)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
