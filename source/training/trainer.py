"""Chainer-style Trainer: runs the Updater until ``stop`` and fires Extensions on interval triggers.

The trainer owns everything a snapshot needs, so ``state_dict``/``load_state_dict`` here are the
single place that defines what "exact resume" covers.
"""
from __future__ import annotations

import math
import signal
import time
from pathlib import Path

from source.config import first_line
from source.training import checkpoint
from source.training.distributed import World, any_rank, assert_replicas_identical, gather_objects
from source.training.runlog import RunLog


class TrainingDiverged(RuntimeError):
    """A loss became NaN/Inf; no snapshot is written so the last good one stays the latest."""


class Extension:
    """Something done every ``interval`` iterations (and, if ``at_end``, after the last one)."""

    interval: int = 1
    at_end: bool = False

    def __call__(self, trainer: "Trainer") -> None:
        raise NotImplementedError

    def finalize(self, trainer: "Trainer") -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Trainer:
    def __init__(self, updater, stop: int, out: Path, world: World, config_dict: dict,
                 extensions: list[Extension] = ()):
        self.updater = updater
        self.stop = stop
        self.out = Path(out)
        self.world = world
        self.config_dict = config_dict
        self.extensions = list(extensions)
        self.log = RunLog(self.out, enabled=world.is_main)
        self.observation: dict[str, float] = {}
        self.elapsed_before = 0.0
        self._start = time.perf_counter()
        self._stop_signal: int | None = None

    @property
    def iteration(self) -> int:
        return self.updater.iteration

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self._start

    def run(self) -> None:
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self.iteration < self.stop:
                self.observation = self.updater.update()
                self._check_finite()
                self._fire_extensions(final=self.iteration == self.stop)
                if any_rank(self._stop_signal is not None, self.world):
                    self._stop_cleanly()
                    return
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for extension in self.extensions:
                extension.finalize(self)
            self.log.close()

    def _fire_extensions(self, final: bool) -> None:
        for extension in self.extensions:
            if self.iteration % extension.interval == 0 or (final and extension.at_end):
                extension(self)

    def _check_finite(self) -> None:
        bad = {k: v for k, v in self.observation.items() if not math.isfinite(v)}
        if bad:
            latest = self.latest_snapshot()
            raise TrainingDiverged(
                f"{', '.join(f'{k}={v}' for k, v in bad.items())} at iteration {self.iteration}; stopped without "
                f"writing a snapshot (last good one: {latest or 'none'})")

    def _request_stop(self, signum, frame) -> None:
        if self._stop_signal is not None:  # a second Ctrl-C means "now"
            raise KeyboardInterrupt
        self._stop_signal = signum
        if self.world.is_main:
            print(f"\n{signal.Signals(signum).name} received: finishing iteration {self.iteration + 1}, "
                  f"then writing a snapshot", flush=True)

    def _stop_cleanly(self) -> None:
        path = self.save_snapshot()
        self.log.event(self.iteration, "interrupted", snapshot=str(path))
        if self.world.is_main:
            print(f"stopped at iteration {self.iteration}; resume with --resume {path}", flush=True)

    # -- snapshots -------------------------------------------------------------------------

    def save_snapshot(self) -> Path:
        """Write ``snapshot_iter_N.pt`` and the generator-only export (collective: call on every rank)."""
        assert_replicas_identical([self.updater.gen_module, self.updater.dis_module], self.world)
        state = self.state_dict()
        path = checkpoint.snapshot_path(self.out, self.iteration)
        if self.world.is_main:
            checkpoint.atomic_save(state, path)
            export = {"iteration": self.iteration, "config": self.config_dict, "gen": state["gen"]}
            checkpoint.atomic_save(export, checkpoint.generator_path(self.out, self.iteration))
        return path

    def latest_snapshot(self) -> Path | None:
        paths = sorted((self.out / "snapshots").glob("snapshot_iter_*.pt"),
                       key=lambda p: int(p.stem.rsplit("_", 1)[1]))
        return paths[-1] if paths else None

    def state_dict(self) -> dict:
        updater = self.updater
        return {
            "iteration": self.iteration,
            "config": self.config_dict,
            "gen": updater.gen_module.state_dict(),
            "dis": updater.dis_module.state_dict(),
            "opt_gen": updater.opt_gen.state_dict(),
            "opt_dis": updater.opt_dis.state_dict(),
            "updater": updater.state_dict(),
            "rng": gather_objects(checkpoint.capture_rng(self.world.device), self.world),
            "data": updater.batches.state_dict(),
            "extensions": {type(e).__name__: e.state_dict() for e in self.extensions},
            "elapsed": self.elapsed,
        }

    def load_state_dict(self, state: dict) -> None:
        updater = self.updater
        try:
            updater.gen_module.load_state_dict(state["gen"])
            updater.dis_module.load_state_dict(state["dis"])
            updater.opt_gen.load_state_dict(state["opt_gen"])
            updater.opt_dis.load_state_dict(state["opt_dis"])
        except (RuntimeError, ValueError) as error:  # tensors or parameter groups of other networks
            raise checkpoint.SnapshotMismatch(first_line(error)) from None
        updater.load_state_dict(state["updater"])
        updater.batches.load_state_dict(state["data"])
        for extension in self.extensions:
            extension.load_state_dict(state["extensions"].get(type(extension).__name__, {}))
        self.elapsed_before = state.get("elapsed", 0.0)
        self._restore_rng(state["rng"])

    def _restore_rng(self, states: list) -> None:
        if len(states) == self.world.size:
            checkpoint.restore_rng(states[self.world.rank], self.world.device)
        elif self.world.is_main:
            print(f"note: snapshot has RNG states of {len(states)} ranks, this run has {self.world.size}; "
                  f"global RNGs are re-seeded (latents and data order are unaffected)")
            checkpoint.seed_everything(self.updater.config.seed + self.world.rank + self.iteration)
