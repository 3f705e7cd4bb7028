"""The config's checks beyond types: model and dataset args against the component they configure, values in
range, and the settings that must agree with each other (batch sizes, world size, classes, training terms).
Each failure is one ``ConfigError`` line naming the source and the dotted key; ``source.config`` calls these
once, when a config is loaded."""
from __future__ import annotations

import inspect
import math
import re
import typing
from typing import TYPE_CHECKING, Any

from source.typed import ConfigError, first_line, reject_unknown, suggest, validate_dataclass, validate_value

if TYPE_CHECKING:
    from source.config import Config, DatasetSpec, ModelSpec, UpdaterConfig


def validate_model_args(spec: ModelSpec, key: str, source: str) -> dict:
    from source.models import MODELS, check_model_args

    if spec.name not in MODELS:
        raise ConfigError(f"{source}: {key}.name: unknown model '{spec.name}'{suggest(spec.name, MODELS)}")
    signature = inspect.signature(MODELS[spec.name])
    hints = typing.get_type_hints(MODELS[spec.name].__init__)
    params = [p for p in signature.parameters if p != "self"]
    reject_unknown(spec.args, params, f"{key}.args", source)
    args = {name: validate_value(v, hints.get(name, Any), f"{key}.args.{name}", source)
            for name, v in spec.args.items()}
    try:
        check_model_args(spec.name, args)
    except ValueError as error:
        raise ConfigError(f"{source}: {key}.args: {first_line(error)}") from None
    return args


def validate_dataset_args(spec: DatasetSpec, args: Any, key: str, source: str) -> Any:
    """The data set's args dataclass, its values checked (whether its files exist is the run's or the dry run's
    to say)."""
    from source.datasets import DATASETS, value_problems

    if spec.name not in DATASETS:
        raise ConfigError(f"{source}: {key}.name: unknown dataset '{spec.name}'{suggest(spec.name, DATASETS)}")
    args = validate_dataclass(args or {}, DATASETS[spec.name][0], f"{key}.args", source)
    problems = value_problems(spec.name, args)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    return args


def check_consistency(config: Config, source: str, world_size: int) -> None:
    positive = ["iteration", "batchsize", "gen_batchsize", "micro_batchsize", "bn_batchsize", "display_interval",
                "snapshot_interval", "evaluation_interval", "spectra_interval", "preview_interval"]
    instead = {"evaluation_interval": " (no evaluation: evaluation.metrics=[])",
               "spectra_interval": " (spectra are what this toolkit watches; a large interval records few)"}
    for name in positive:
        if getattr(config, name) is not None and getattr(config, name) <= 0:
            raise ConfigError(f"{source}: {name}: must be positive, got {getattr(config, name)}{instead.get(name, '')}")
    if config.micro_batchsize % config.bn_batch:
        raise ConfigError(f"{source}: bn_batchsize: micro_batchsize {config.micro_batchsize} is not a multiple of "
                          f"{config.bn_batch}")
    per_step = config.micro_batchsize * world_size
    for name, value in (("batchsize", config.batchsize), ("gen_batchsize", config.gen_batch)):
        if value % per_step:
            raise ConfigError(
                f"{source}: {name}: {value} is not divisible by micro_batchsize x world size "
                f"= {config.micro_batchsize} x {world_size} = {per_step}")
    if config.updater.n_dis < 1 or config.updater.sr.interval < 1:
        raise ConfigError(f"{source}: updater.n_dis and updater.sr.interval must be >= 1")
    collapse = config.updater.collapse
    if not 0 < collapse.threshold < 1 or collapse.min_layers < 1:
        raise ConfigError(f"{source}: updater.collapse: threshold must be in (0, 1) and min_layers >= 1, got "
                          f"{collapse.threshold} and {collapse.min_layers}")
    for name, adam in (("adam_G", config.adam_G), ("adam_D", config.adam_D)):
        if not (0 <= adam.alpha <= 1 and 0 <= adam.beta1 < 1 and 0 <= adam.beta2 < 1 and 0 <= adam.eps <= 1):
            raise ConfigError(f"{source}: {name}: need 0 <= alpha <= 1, 0 <= beta1 < 1, 0 <= beta2 < 1 and "
                              f"0 <= eps <= 1, got "
                              f"alpha={adam.alpha}, beta1={adam.beta1}, beta2={adam.beta2}, eps={adam.eps}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d{1,4})?", config.device):
        raise ConfigError(f"{source}: device: expected auto, cpu, cuda or cuda:N, got {config.device!r}")
    if not 0 <= config.seed < 2**32:  # numpy's and the phase draws' seeds are 32-bit
        raise ConfigError(f"{source}: seed: must be in [0, 2^32), got {config.seed}")
    if config.num_workers < 0:
        raise ConfigError(f"{source}: num_workers: must be >= 0, got {config.num_workers}")
    updater = config.updater
    if updater.resume_artefact != "never" and (updater.resume_artefact_devices < 2 or world_size > 1
                                             or config.micro_batchsize % updater.resume_artefact_devices):
        raise ConfigError(f"{source}: updater.resume_artefact: needs resume_artefact_devices >= 2 dividing "
                          f"micro_batchsize ({updater.resume_artefact_devices}, {config.micro_batchsize}) and one "
                          f"process (world size {world_size})")
    if config.evaluation.modes_interval < 0 or config.evaluation.modes_samples < 20:
        raise ConfigError(f"{source}: evaluation.modes_interval must be >= 0 (0: off) and evaluation.modes_samples "
                          f">= 20, got {config.evaluation.modes_interval} and {config.evaluation.modes_samples}")
    if config.evaluation.standing_steps < 1:
        raise ConfigError(f"{source}: evaluation.standing_steps: must be >= 1 (forwards accumulating G's standing "
                          f"BatchNorm statistics), got {config.evaluation.standing_steps}")
    gen_classes = config.models.generator.arg("n_classes")
    dis_classes = config.models.discriminator.arg("n_classes")
    if gen_classes != dis_classes:
        raise ConfigError(f"{source}: models: generator n_classes={gen_classes} but discriminator n_classes={dis_classes}")
    check_terms(config.updater, gen_classes, source)
    check_image_size(config, source)
    check_step_graphs(config, source, world_size)
    check_under_ddp(config, source, world_size)
    check_data_on_device(config, source)


def check_image_size(config: Config, source: str) -> None:
    """The data's size against G's resolution before any image is read (STL-10 shrinks all its images first;
    build.check_dataset_matches_models checks what the data turned out to be)."""
    size, resolution = getattr(config.dataset.args, "size", None), config.models.generator.arg("resolution")
    if size is not None and size != resolution:
        raise ConfigError(f"{source}: dataset.args.size: {size} but the generator is built for {resolution} px; "
                          f"set dataset.args.size={resolution}")


def check_data_on_device(config: Config, source: str) -> None:
    from source.datasets import DATASETS
    from source.datasets.device_batches import holds_images_in_memory

    if config.performance.data_on_device and not holds_images_in_memory(DATASETS[config.dataset.name][1]):
        held = sorted(name for name, (_, build) in DATASETS.items() if holds_images_in_memory(build))
        raise ConfigError(f"{source}: performance.data_on_device: dataset '{config.dataset.name}' is read from disk "
                          f"as it goes; only the data sets held in memory can live on the device: {', '.join(held)}")


def check_step_graphs(config: Config, source: str, world_size: int) -> None:
    """What a step captured as one CUDA graph cannot hold: per-step host work, other graphs, other processes."""
    if not config.performance.step_graphs:
        return
    conflicts = [(world_size > 1, f"world size {world_size} (DDP)"),
                 (config.performance.amp == "fp16", "performance.amp fp16 (its loss scaler decides on the host)"),
                 (config.performance.compile and config.performance.compile_mode != "default",
                  f"compile_mode {config.performance.compile_mode} (CUDA graphs of its own)")]
    found = [what for conflict, what in conflicts if conflict]
    if found:
        raise ConfigError(f"{source}: performance.step_graphs: not with {', '.join(found)}")


def check_under_ddp(config: Config, source: str, world_size: int) -> None:
    """What torchrun's ranks cannot share. One GPU named for all (every rank would use it: NCCL fails at the first
    collective); compile's CUDA-graph modes, whose upstream hangs and slowdowns with DDP are open (pytorch#140395,
    #139207) and which have not run here on GPUs."""
    if world_size == 1:
        return
    if config.device.startswith("cuda:"):
        raise ConfigError(f"{source}: device: {config.device} names one GPU, but torchrun started {world_size} ranks, "
                          "each of which takes the GPU of its LOCAL_RANK: use device cuda or auto (on a resume: "
                          "--set device=cuda)")
    performance = config.performance
    if performance.compile and performance.compile_mode != "default":
        raise ConfigError(f"{source}: performance.compile_mode {performance.compile_mode}: its CUDA graphs are not "
                          f"used with DDP (world size {world_size}) here; use compile_mode default under torchrun")


def check_terms(updater: UpdaterConfig, n_classes: int, source: str) -> None:
    """gSR, LeCam, DiffAugment and the EMA: values in range, and a conditional G where they need one."""
    from source.regularizers import parse_policy

    gsr, lecam, ema = updater.gsr, updater.lecam, updater.ema
    checks = [
        (math.isfinite(gsr.weight) and gsr.weight >= 0, "gsr.weight", "must be a finite number >= 0", gsr.weight),
        (0 < gsr.effective_number_beta < 1, "gsr.effective_number_beta", "must be in (0, 1)", gsr.effective_number_beta),
        (gsr.power_iterations >= 1, "gsr.power_iterations", "must be >= 1", gsr.power_iterations),
        (not gsr.enabled or n_classes > 0, "gsr.enabled", "gSR regularizes class-conditional BN: needs a generator "
         f"with n_classes > 0 (models.generator.args.n_classes is {n_classes})", gsr.enabled),
        (not (updater.fake_labels == "data" and n_classes == 0), "fake_labels", "'data' needs a class-conditional "
                                                                              "generator", updater.fake_labels),
        (math.isfinite(lecam.weight) and lecam.weight >= 0, "lecam.weight", "must be a finite number >= 0 (0 is off)",
         lecam.weight),
        (0 <= lecam.decay < 1, "lecam.decay", "must be in [0, 1)", lecam.decay),
        (lecam.start_iteration >= 0, "lecam.start_iteration", "must be >= 0", lecam.start_iteration),
        (0 <= ema.decay < 1, "ema.decay", "must be in [0, 1)", ema.decay),
        (ema.start_iteration >= 0, "ema.start_iteration", "must be >= 0", ema.start_iteration),
    ]
    for ok, key, problem, value in checks:
        if not ok:
            raise ConfigError(f"{source}: updater.{key}: {problem}, got {value!r}")
    try:
        parse_policy(updater.diffaugment)
    except ValueError as error:
        raise ConfigError(f"{source}: updater.diffaugment: {error}") from None
