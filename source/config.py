"""Experiment configuration: YAML -> ``--set`` overrides -> typed, validated objects.

The YAML mirrors the original ``config.yml`` (README, "What is where").  Every problem is reported as a
single ``ConfigError`` line naming the file and the dotted key, before any work starts: types here
(``source.typed``), values and their consistency in ``source/config_checks.py``, the one validation layer.
"""
from __future__ import annotations

import copy
import difflib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from source.config_checks import check_consistency, validate_dataset_args, validate_model_args
from source.files import atomic_write_text
from source.overrides import adapt_dataset_args, apply_override, blame_overrides, mapping
# first_line: re-exported for the modules that import it from here
from source.typed import ConfigError, check_expansion, first_line, read_yaml, to_plain, validate  # noqa: F401


@dataclass
class ModelSpec:
    name: str
    args: dict = field(default_factory=dict)

    def arg(self, key: str) -> Any:
        """An argument as the model is built with it: the config's, else the constructor's default (which differs
        between models: BigGAN's resolution is 32, SNGAN's 128)."""
        from source.models import MODELS

        return self.args[key] if key in self.args else inspect.signature(MODELS[self.name]).parameters[key].default


@dataclass
class ModelsConfig:
    generator: ModelSpec
    discriminator: ModelSpec


@dataclass
class DatasetSpec:
    name: str
    args: Any = None  # replaced by the dataset's typed args dataclass during validation


@dataclass
class AdamConfig:
    alpha: float = 2e-4
    beta1: float = 0.0
    beta2: float = 0.9
    eps: float = 1e-8


@dataclass
class SRConfig:
    mode: Literal["dynamic", "static", "rescale"] = "dynamic"  # rescale: the W / s_1 control (no reshaping)
    interval: int = 5
    include_linear: bool = False
    rebase_on_resume: bool = False


@dataclass
class CollapseConfig:
    threshold: float = 0.5   # a layer collapses when its score falls below threshold x its running max
    min_layers: int = 1


@dataclass
class GSRConfig:
    """Group spectral regularization of G's class-conditional BN (Rangwani et al., 2022; source/spectral/gsr.py)."""
    enabled: bool = False
    weight: float = 0.5                 # w: the mean of the per-class weights lambda_y (released: sn_reg_weight)
    class_balanced: bool = True         # lambda_y from effective numbers (Cui et al.); false: lambda_y = 1, weight unused
    effective_number_beta: float = 0.999
    power_iterations: int = 4           # per G step; 10x on the first call
    released_beta_estimate: bool = False  # the release's bias branch (uses the gain's v): a lower bound of sigma


@dataclass
class LeCamConfig:
    """LeCam regularization of D (Tseng et al., 2021; source/regularizers/lecam.py); weight 0 is off."""
    weight: float = 0.0
    # gsr: as gSR released it (per-sample EMA anchors, relu(D_fake - a_real)^2); lecam: LeCam-GAN / StudioGAN
    # (scalar EMA anchors of the batch means, relu(a_real - D_fake)^2, from start_iteration)
    form: Literal["gsr", "lecam"] = "gsr"
    decay: float = 0.99
    start_iteration: int = 0


@dataclass
class EMAConfig:
    """Exponential moving average of G's state (source/regularizers/ema.py); evaluation and exports use it."""
    enabled: bool = False
    decay: float = 0.9999
    start_iteration: int = 1000         # before it, the average is a copy of G


@dataclass
class UpdaterConfig:
    n_dis: int = 1
    loss_type: Literal["hinge", "dcgan"] = "hinge"
    apply_SR: Union[bool, Literal["auto"]] = False
    # d_first (SRGANs): D step, SR, G step, remaining D steps; g_first (sngan_projection): G step, then the D steps
    order: Literal["d_first", "g_first"] = "d_first"
    sr: SRConfig = field(default_factory=SRConfig)
    collapse: CollapseConfig = field(default_factory=CollapseConfig)
    gsr: GSRConfig = field(default_factory=GSRConfig)
    lecam: LeCamConfig = field(default_factory=LeCamConfig)
    diffaugment: str = ""               # DiffAugment policy for D's inputs, e.g. "color,translation,cutout"; "" off
    fake_labels: Literal["uniform", "data"] = "uniform"  # G's labels: uniform (released) or the training data's prior
    ema: EMAConfig = field(default_factory=EMAConfig)
    # the SRGANs code's resume artefact (source/training/resume_artefact.py), an ablation: never; branch (a resume into
    # a new run folder, e.g. the SN snapshot resumed with SR); every resume (as the original, on 4 devices)
    resume_artefact: Literal["never", "branch", "every"] = "never"
    resume_artefact_devices: int = 4


@dataclass
class EvaluationConfig:
    """IS/FID/KID during training (every ``evaluation_interval``) and the defaults of ``evaluation.py metrics``."""
    n_samples: int = 5000          # generated images per evaluation (original: 5000; published numbers: 50000)
    splits: int = 1                # Inception Score splits (original during training: 1; published: 10)
    batch_size: int = 100          # generated and scored per forward
    # G's BatchNorm while generating: running = eval mode, the running statistics (sngan_projection); batch = each
    # generation batch's statistics (gSR's StudioGAN release); standing = BigGAN's standing statistics, a cumulative
    # average over standing_steps seeded forwards of batch_size random (z, y), then eval mode (docs/evaluation.md)
    g_batchnorm: Literal["running", "batch", "standing"] = "running"
    standing_steps: int = 16
    metrics: list[Literal["is", "fid", "kid"]] = field(default_factory=lambda: ["is", "fid"])  # [] turns evaluation off
    # torch-fidelity weights .pth, "fid-helper" (offline, FID/KID only), or null: download cache, else fid-helper
    inception_weights: Union[str, None] = None
    reference_stats: Union[str, None] = None    # a statistics .npz (e.g. TTUR's); null: the dataset's, cached
    reference_images: Union[int, None] = None   # real images in the dataset reference; null: all of them
    cache_dir: str = "data/reference_stats"     # where dataset references are cached
    # the reference data: null = the training data as configured; a split name (test, val, eval) = the same data
    # set with that split and no long tail (the balanced evaluation set of long-tailed training data)
    reference_split: Union[str, None] = None
    # intra-FID groups by training images per class (gSR): many > many_above, few <= few_at_most, medium between
    many_above: int = 100
    few_at_most: int = 40
    # the collapse study's classifier measures of G (modes, diversity, classifier FID; source/training/modes.py)
    # -> classifier_modes.jsonl every modes_interval iterations (0: off); for 32x32 gray 10-class (Fashion-MNIST) generators
    modes_interval: int = 0
    modes_samples: int = 1000


@dataclass
class PerformanceConfig:
    """How the arithmetic runs, never what the recipe is (source/training/performance.py; ``data_on_device`` draws
    the dequantization noise from another stream of the same distribution); the default is the originals' plain
    fp32."""
    amp: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast G's and D's forwards (fp16: with loss scaling)
    channels_last: bool = False                  # NHWC activations and weights: faster convs on tensor cores
    compile: bool = False                        # torch.compile G and D (in place; snapshots unchanged)
    # reduce-overhead: CUDA graphs, for small launch-bound models (the 32 px ones); max-autotune: searches kernels,
    # with CUDA graphs too
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    tf32: bool = False                           # TF32 fp32 matmuls and convs on NVIDIA GPUs (10-bit mantissa)
    fused_adam: bool = False                     # Adam's step in one fused kernel: the same update to float rounding
    # each D step and G step captured once as a CUDA graph and replayed (source/training/step_graphs.py): for the
    # launch-bound 32 px models; one process, not with fp16 or a compile_mode with CUDA graphs of its own
    step_graphs: bool = False
    # the whole data set held on the device and batches made there (source/datasets/device_batches.py), without the
    # loader's ~1 ms of CPU per batch (num_workers unused): the loader's batches, the dequantization noise aside
    # (another stream of it); for the data sets held in memory (Fashion-MNIST, CIFAR-10, STL-10, synthetic)
    data_on_device: bool = False
    # SR's float64 SVDs on the CPU, the edit copied back: for the 32 px models' small matrices (32 x 288), where a
    # GPU's solver launches may cost more than the arithmetic; the same edit to float64 rounding
    sr_on_cpu: bool = False
    cudnn_benchmark: bool = True                 # autotune conv kernels (always off with deterministic: true)


@dataclass
class Config:
    models: ModelsConfig
    dataset: DatasetSpec
    seed: int = 0
    iteration: int = 500000
    iteration_decay_start: int = 500000
    batchsize: int = 64
    gen_batchsize: Union[int, None] = None  # the G step's global batch; null: batchsize (SRGANs CIFAR: 2x)
    micro_batchsize: int = 32
    # G's BatchNorm statistics over groups of this many samples of a micro-batch (ghost BN); null: the whole
    # micro-batch. The original's 32 with micro-batches of 256 is its recipe in 8x fewer accumulation steps.
    bn_batchsize: Union[int, None] = None
    display_interval: int = 100
    snapshot_interval: int = 10000
    evaluation_interval: int = 5000
    spectra_interval: int = 5000
    preview_interval: int = 1000
    num_workers: int = 4
    device: str = "auto"
    deterministic: bool = False
    adam_G: AdamConfig = field(default_factory=AdamConfig)
    adam_D: AdamConfig = field(default_factory=AdamConfig)
    updater: UpdaterConfig = field(default_factory=UpdaterConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)

    @property
    def bn_batch(self) -> int:
        return self.micro_batchsize if self.bn_batchsize is None else self.bn_batchsize

    @property
    def gen_batch(self) -> int:
        return self.batchsize if self.gen_batchsize is None else self.gen_batchsize

    def accumulation_steps(self, world_size: int, batchsize: int | None = None) -> int:
        """Micro-batches per rank for one optimizer step on ``batchsize`` (default: D's) samples."""
        return (batchsize or self.batchsize) // (self.micro_batchsize * world_size)

    def to_dict(self) -> dict:
        return to_plain(self)


# ---------------------------------------------------------------------------------------------
# Loading and overrides

def load_config(path: str | Path, overrides: list[str] = (), world_size: int = 1) -> Config:
    """Read ``path``, apply ``key=value`` overrides and validate."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory; give a YAML file such as configs/demo.yaml")
    if not path.is_file():
        beside = [p.name for p in path.parent.glob("*.y*ml")] if path.parent.is_dir() else []
        close = difflib.get_close_matches(path.name, beside, n=1, cutoff=0.6)
        raise ConfigError(f"{path}: config file not found" + (f" (did you mean {path.parent / close[0]}?)" if close
                                                               else ""))
    raw = read_yaml(path, str(path)) or {}
    if isinstance(raw, dict) and {"base", "arms"} <= raw.keys():
        raise ConfigError(f"{path} is a study file (its runs' configs are its base with its arms' changes): run it "
                          f"with python -m source.study, or train its base config, {str(raw['base'])[:200]}")
    return config_from_dict(raw, overrides, source=str(path), world_size=world_size)


def config_from_dict(raw: dict, overrides: list[str] = (), source: str = "<dict>",
                     world_size: int = 1) -> Config:
    """``raw`` (not changed: a snapshot's config, say) with ``overrides``, validated."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    check_expansion(raw, source)
    given, raw = raw, copy.deepcopy(raw)  # only now: a deep one would exhaust the recursion
    file_dataset = mapping(raw, "dataset")
    file_name = file_dataset.get("name")  # before overrides
    for override in overrides:
        apply_override(raw, override, source)
    adapt_dataset_args(raw, file_name, list(overrides))
    try:
        config = validate(raw, Config, "", source, _refine)
        check_consistency(config, source, world_size)
    except ConfigError as error:
        raise blame_overrides(error, source, list(overrides), given, raw) from None
    return config


# ---------------------------------------------------------------------------------------------
# Validation into typed objects

def _refine(instance: Any, value: dict, key: str, source: str) -> Any:
    """Model and dataset args are checked against the component their name selects."""
    if isinstance(instance, ModelSpec):
        instance.args = validate_model_args(instance, key, source)
    elif isinstance(instance, DatasetSpec):
        instance.args = validate_dataset_args(instance, value.get("args"), key, source)
    return instance


# ---------------------------------------------------------------------------------------------
# Writing

def save_config(config: Config, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
