"""A study file: one base experiment, the settings and arms it compares, the seeds; each run checked up front.

```yaml
base: configs/collapse/fmnist_cifar_recipe_ch32.yaml   # the experiment every run starts from
seeds: [0, 1, 2]
set: [evaluation.modes_interval=1000]                  # --set overrides of every run
settings: {b64: [], b16: [batchsize=16, gen_batchsize=32, micro_batchsize=16]}   # one folder each
arms:
  sn: {}                                               # the base as it is
  static_sr: {set: [updater.apply_SR=true, updater.sr.mode=static]}
  sr_resumed: {branch: sn, at: collapse, set: [updater.apply_SR=true, updater.sr.mode=dynamic]}
saved_state: docs/collapse/gpu_study_state   # optional: the state kept with the code (source/study/saved.py)
```
A run is (setting, arm, seed), in the folder ``ROOT/<setting>/<arm>_s<seed>``. A branching arm continues
its parent arm's run of the same setting and seed from the parent's latest snapshot at or before ``at``: an
iteration, or ``collapse``: the detector's last check before the first collapse it logs (``event:
collapse``), i.e. the last snapshot it still called healthy; the branch's ``set`` is applied on top of the
parent's settings at the resume. Problems are one-line
``ConfigError``s naming the file and key, found before any run starts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

from source.config import Config, ConfigError, load_config
from source.typed import read_yaml, suggest, validate_dataclass, validate_value

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MOST_RUNS = 1000  # settings x arms x seeds: the GPU study has 2 x 6 x 3


@dataclass
class ArmSpec:
    set: list[str] = field(default_factory=list)
    branch: Union[str, None] = None                      # the parent arm (same setting and seed)
    at: Union[int, Literal["collapse"]] = "collapse"     # where the branch leaves its parent


@dataclass
class StudySpec:
    base: str
    arms: dict
    seeds: list[int] = field(default_factory=lambda: [0])
    set: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=lambda: {"default": []})
    saved_state: Union[str, None] = None  # a folder (relative to the working directory, as `base`)


@dataclass(frozen=True)
class Run:
    setting: str
    arm: str
    seed: int
    overrides: tuple[str, ...]          # of a fresh run; a branch's own `set` for its resume
    parent: Union[str, None] = None     # the parent run's name
    at: Union[int, str] = "collapse"
    iteration: int = 0                  # the run's target (the config's `iteration`)
    spectra_interval: int = 1           # its collapse detector's checks (a branch leaves at the last healthy one)

    @property
    def name(self) -> str:
        return f"{self.setting}/{self.arm}_s{self.seed}"


@dataclass(frozen=True)
class Study:
    path: Path
    spec: StudySpec
    runs: tuple[Run, ...]

    @property
    def name(self) -> str:
        """The study file's name without its suffix: its default folder, results/NAME, and what carries and returned
        files are made for."""
        return self.path.stem

    def saved_folder(self) -> Path | None:
        """Where the study's state is kept with the code (``saved.save``), if the study file names a folder."""
        return None if self.spec.saved_state is None else Path(self.spec.saved_state)

    def run(self, name: str) -> Run:
        return next(run for run in self.runs if run.name == name)

    def select(self, settings: list[str] | None = None, seeds: list[int] | None = None,
               arms: list[str] | None = None) -> list[Run]:
        """The runs of these settings, seeds and arms (None: all); a name the study lacks is a ConfigError."""
        asked = {"setting": settings, "seed": seeds, "arm": arms}
        for key, values in asked.items():
            known = {getattr(run, key) for run in self.runs}
            unknown = sorted(set(values or []) - known)
            if unknown:
                raise ConfigError(f"--{key} {unknown[0]}: the study has {sorted(known)}")
        return [run for run in self.runs
                if all(values is None or getattr(run, key) in values for key, values in asked.items())]

    def data_root(self) -> Path | None:
        """The folder the study's data lies in, which ``carry`` packs: its first run's (None for data without one,
        e.g. synthetic)."""
        return self.configured_root(next(run for run in self.runs if run.parent is None))

    def configured_root(self, run: Run) -> Path | None:
        """The folder ``run``'s config reads its data from (a branch: its parent's, unless its own items move it)."""
        root = getattr(self.config(run).dataset.args, "root", None)
        return None if root is None else Path(root)

    def config(self, run: Run) -> Config:
        """The run's recipe: the base with its items (a branch: its parent's, then its own)."""
        parent = next((other for other in self.runs if other.name == run.parent), None)
        return load_config(self.spec.base, [*parent.overrides, *run.overrides] if parent else list(run.overrides))


def load_study(path: str | Path) -> Study:
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ConfigError(f"{source}: no such study file")
    spec = validate_dataclass(read_yaml(path, source), StudySpec, "", source)
    arms = {name: validate_dataclass(value if value is not None else {}, ArmSpec, f"arms.{name}", source)
            for name, value in spec.arms.items()}
    settings = {name: validate_value(value or [], list[str], f"settings.{name}", source)
                for name, value in spec.settings.items()}
    _check_names(arms, settings, spec.seeds, source)
    runs = [run for setting, extra in settings.items() for name, arm in arms.items() for seed in spec.seeds
            for run in [_run(spec, setting, extra, name, arm, seed, arms, source)]]
    return Study(path, spec, tuple(runs))


def _check_names(arms: dict[str, ArmSpec], settings: dict, seeds: list[int], source: str) -> None:
    if not arms or not settings or not seeds:
        raise ConfigError(f"{source}: arms, settings and seeds must each name at least one")
    runs = len(settings) * len(arms) * len(seeds)
    if runs > MOST_RUNS:  # each is a training run whose config is built now: a file from elsewhere could ask millions
        raise ConfigError(f"{source}: {len(settings)} settings x {len(arms)} arms x {len(seeds)} seeds = {runs} runs; "
                          f"a study holds at most {MOST_RUNS}")
    for key, names in (("arms", arms), ("settings", settings)):
        for name in names:
            if not NAME.fullmatch(str(name)):
                raise ConfigError(f"{source}: {key}.{name}: names are letters, digits, '_', '.', '-' (folder names)")
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"{source}: seeds: need distinct seeds >= 0, got {seeds}")
    for name, arm in arms.items():
        if arm.branch is not None:
            others = [a for a in arms if a != name]
            if arm.branch not in others:
                raise ConfigError(f"{source}: arms.{name}.branch: {arm.branch!r} is not another arm of the study"
                                  f"{suggest(arm.branch, others)}")
            if arms[arm.branch].branch is not None:
                raise ConfigError(f"{source}: arms.{name}.branch: {arm.branch} is itself a branch; branch from an "
                                  "arm that starts from scratch")
        if isinstance(arm.at, int) and arm.at < 1:
            raise ConfigError(f"{source}: arms.{name}.at: an iteration >= 1 or 'collapse', got {arm.at}")


def _run(spec: StudySpec, setting: str, extra: list[str], name: str, arm: ArmSpec, seed: int,
         arms: dict[str, ArmSpec], source: str) -> Run:
    """The run, its config built now so that a bad override stops the study before anything starts."""
    fresh = [*spec.set, *extra, f"seed={seed}"]
    where = f"{source} (setting {setting}, arm {name}, seed {seed})"
    chosen_per_chunk = [item for item in (*fresh, *arm.set) if item.startswith("performance.")]
    if chosen_per_chunk:
        raise ConfigError(f"{where}: {chosen_per_chunk[0]}: how the arithmetic runs is chosen per chunk (--set of "
                          "`run` and `device`), not in the study file")
    config = _config(spec.base, [*fresh, *(arms[arm.branch].set if arm.branch else []), *arm.set], where)
    if arm.branch is None:
        return Run(setting, name, seed, (*fresh, *arm.set), iteration=config.iteration,
                   spectra_interval=config.spectra_interval)
    if isinstance(arm.at, int) and arm.at >= config.iteration:
        raise ConfigError(f"{source}: arms.{name}.at: {arm.at} is not before the run's end ({config.iteration})")
    return Run(setting, name, seed, tuple(arm.set), parent=f"{setting}/{arm.branch}_s{seed}", at=arm.at,
               iteration=config.iteration, spectra_interval=config.spectra_interval)


def _config(base: str, overrides: list[str], where: str) -> Config:
    try:
        return load_config(base, overrides)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
