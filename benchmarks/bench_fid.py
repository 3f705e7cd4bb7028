"""CPU benchmark: our FID pipeline against torch-fidelity's `calculate_metrics` on the same images.

Both run the same network (torch-fidelity's inception-v3-compat) with the same weights (the
offline fid-helper copy, converted; written to a temporary torch-fidelity `.pth` for
torch-fidelity), so the FIDs must agree and only the pipelines' overheads and the matrix
square root differ. Also times Tr(sqrt(S1 S2)) at 2048-d: ours (pivoted Cholesky + symmetric
eigenvalues), torch-fidelity's (eigvals of S1 S2) and the original's (scipy sqrtm).

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_fid.py [--images 64] [--out benchmarks/results/fid_cpu.json]

(On a small shared machine, multithreaded OpenBLAS makes 2048-d eigensolvers 10x slower and erratic.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import scipy.linalg
import torch
import torch_fidelity

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from source.metrics import (  # noqa: E402
    FID_HELPER,
    InceptionBackbone,
    convert_fid_helper_weights,
    feature_statistics,
    frechet_distance,
    trace_sqrt_product,
)


class ImageSet(torch.utils.data.Dataset):
    """uint8 CHW tensors, the input torch-fidelity accepts besides image folders."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def two_image_sets(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 images; the second set is smoother and brighter, so their FID is far from 0."""
    generator = torch.Generator().manual_seed(0)
    first = torch.randint(0, 256, (n, 3, size, size), generator=generator, dtype=torch.uint8)
    coarse = torch.randint(64, 256, (n, 3, size // 4, size // 4), generator=generator, dtype=torch.uint8)
    second = torch.nn.functional.interpolate(coarse.float(), size=(size, size), mode="bilinear").round().byte()
    return first, second


def timed(function, *args, **kwargs) -> tuple[object, dict[str, float]]:
    """Result and seconds: wall clock, and CPU time of this process (less sensitive to other jobs)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return result, {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def total(*timings: dict[str, float]) -> dict[str, float]:
    return {name: sum(timing[name] for timing in timings) for name in ("wall_s", "cpu_s")}


def our_fid(first: torch.Tensor, second: torch.Tensor, batch_size: int) -> dict:
    backbone, load = timed(InceptionBackbone, FID_HELPER)

    def pool3(images):
        batches = (images[i : i + batch_size] for i in range(0, len(images), batch_size))
        return np.concatenate([backbone.features(batch).pool3 for batch in batches])

    (features1, features2), extract = timed(lambda: (pool3(first), pool3(second)))
    fid, distance = timed(lambda: frechet_distance(*feature_statistics(features1), *feature_statistics(features2)))
    return {
        "fid": fid,
        "load": load,
        "extract": extract,
        "images_per_wall_s": (len(first) + len(second)) / extract["wall_s"],
        "distance": distance,
        "total": total(load, extract, distance),
    }


def torch_fidelity_fid(first: torch.Tensor, second: torch.Tensor, batch_size: int, weights_path: str) -> dict:
    metrics, timing = timed(
        torch_fidelity.calculate_metrics,
        input1=ImageSet(first),
        input2=ImageSet(second),
        fid=True,
        feature_extractor_weights_path=weights_path,
        batch_size=batch_size,
        cuda=False,
        cache=False,
        save_cpu_ram=True,  # no DataLoader worker processes: the images are already in memory
        verbose=False,
    )
    return {"fid": metrics["frechet_inception_distance"], "total": timing}


def square_root_timings(dim: int, n_samples: int) -> dict:
    """Tr(sqrt(S1 S2)) of full-rank dim x dim covariances by three methods (seconds, value)."""
    rng = np.random.default_rng(0)
    scales = np.linspace(0.1, 2.0, dim)
    sigma1 = np.cov(rng.standard_normal((n_samples, dim)) * scales, rowvar=False)
    sigma2 = np.cov(rng.standard_normal((n_samples, dim)) * scales[::-1] + 0.1, rowvar=False)
    ours, ours_time = timed(trace_sqrt_product, sigma1, sigma2)
    eigvals, eigvals_time = timed(lambda: np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).astype(complex)).real.sum())
    sqrtm, sqrtm_time = timed(lambda: np.trace(scipy.linalg.sqrtm(sigma1 @ sigma2)).real)
    return {
        "dim": dim,
        "ours_pivoted_cholesky_eigvalsh": ours_time,
        "torch_fidelity_eigvals": eigvals_time,
        "original_scipy_sqrtm": sqrtm_time,
        "ours_value": ours,
        "max_rel_diff_to_ours": max(abs(eigvals - ours), abs(sqrtm - ours)) / ours,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images per set")
    parser.add_argument("--size", type=int, default=32, help="image side before the resize to 299")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of both; the least CPU time counts")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "fid_cpu.json"))
    args = parser.parse_args()

    first, second = two_image_sets(args.images, args.size)
    with tempfile.TemporaryDirectory() as directory:
        weights_path = os.path.join(directory, "inception-fid-helper-pool3.pth")
        torch.save(convert_fid_helper_weights(), weights_path)
        runs = [
            (our_fid(first, second, args.batch_size), torch_fidelity_fid(first, second, args.batch_size, weights_path))
            for _ in range(args.repeats)
        ]
    ours = min((run[0] for run in runs), key=lambda run: run["total"]["cpu_s"])
    theirs = min((run[1] for run in runs), key=lambda run: run["total"]["cpu_s"])
    square_root = square_root_timings(2048, 4096)

    result = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_1min_at_end": os.getloadavg()[0],
            # OpenBLAS threads spinning on an oversubscribed machine slow 2048-d eigensolvers 10x or more
            "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
            "torch": torch.__version__,
            "torch_fidelity": torch_fidelity.__version__,
        },
        "images_per_set": args.images,
        "image_size": args.size,
        "batch_size": args.batch_size,
        "ours": ours,
        "torch_fidelity": theirs,
        "all_runs_total": {
            "ours": [run[0]["total"] for run in runs],
            "torch_fidelity": [run[1]["total"] for run in runs],
        },
        "fid_abs_diff": abs(ours["fid"] - theirs["fid"]),
        "total_ratio_torch_fidelity_over_ours": {
            name: theirs["total"][name] / ours["total"][name] for name in ("wall_s", "cpu_s")
        },
        "trace_sqrt_2048": square_root,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as file:
        json.dump(result, file, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
