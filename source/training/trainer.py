"""Chainer-style Trainer: runs the Updater until ``stop`` and fires Extensions on interval triggers.

The trainer owns everything a snapshot needs, so ``state_dict``/``load_state_dict`` here are the
single place that defines what "exact resume" covers.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from pathlib import Path

from source.config import first_line
from source.training import checkpoint
from source.training.distributed import World, any_rank, assert_replicas_identical, gather_objects
from source.training.extension import Extension, read_losses
from source.training.runlog import RunLog, read_jsonl


class TrainingDiverged(RuntimeError):
    """A loss, weight or optimizer state became NaN/Inf; no snapshot is written so the last good one stays the latest."""


class SnapshotWriteError(RuntimeError):
    """A snapshot could not be written (disk full, folder gone); the earlier snapshots are intact."""


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
        self._unread: list[tuple[int, dict]] = []  # (iteration, its losses on the device) not read yet
        self.elapsed_before = 0.0
        self._start = time.perf_counter()
        self._stop_signal: int | None = None
        self._pending: list[Extension] | None = None  # while an iteration's extensions run: those not yet done
        self._saved_at: int | None = None  # the iteration of this process's last snapshot
        self._catching_up = False  # see catch_up
        self._closed = False

    @property
    def iteration(self) -> int:
        return self.updater.iteration

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self._start

    def run(self) -> None:
        """Train until ``stop`` or a stop signal (Ctrl-C, SIGTERM: finish the iteration, write a snapshot)."""
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self.advance():
                pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.close()

    def advance(self) -> bool:
        """One iteration and the extensions due after it; False once the run is done or has stopped on a signal
        (then its snapshot is written). ``run`` loops over it; a group of runs in one process
        (``source.training.group``) interleaves several trainers' calls."""
        if self._catching_up:
            self._catch_up()
        if self.iteration >= self.stop:
            return False
        try:
            losses = self.updater.update()
        except RuntimeError:  # e.g. SR's SVD of weights that a NaN among the unread losses broke: say that
            self._read_losses_after_a_failure()
            raise
        self._unread.append((self.iteration, losses))
        self._fire_extensions(final=self.iteration == self.stop)
        if any_rank(self._stop_signal is not None, self.world):
            self._read_losses()
            self._stop_cleanly()
            return False
        return self.iteration < self.stop

    def close(self) -> None:
        """After the last ``advance``, also after an error: the extensions finish, the log is closed (once)."""
        if self._closed:
            return
        self._closed = True
        try:
            for extension in self.extensions:
                extension.finalize(self)
        finally:
            self.log.close()
            if close_batches := getattr(self.updater.batches, "close", None):  # the loader's worker processes
                close_batches()

    def catch_up(self) -> None:
        """After a resume in place: the first ``advance`` (where a stop signal is handled as in training) first runs
        each extension due at this iteration that keeps rows (an evaluation, the mode measures) whose file has no
        row for it. The snapshot is written before them, so a crash or a second signal during one left the
        iteration unmeasured (a finished run its last measure)."""
        self._catching_up = True

    def _catch_up(self) -> None:
        self._catching_up = False
        for extension in self._due(final=self.iteration == self.stop):
            if extension.record_file is None:
                continue
            rows = read_jsonl(self.out / extension.record_file) if self.world.is_main else []
            unmeasured = self.world.is_main and all(row.get("iteration") != self.iteration for row in rows)
            if any_rank(unmeasured, self.world):  # rank 0's files decide: an evaluation is collective
                extension(self)

    def _due(self, final: bool) -> list[Extension]:
        return [e for e in self.extensions if self.iteration % e.interval == 0 or (final and e.at_end)]

    def _fire_extensions(self, final: bool) -> None:
        due = self._due(final)
        if any(extension.reads_losses for extension in due):
            self._read_losses()
        self._pending = list(due)
        try:
            for extension in due:
                saved = self._saved_at == self.iteration
                extension(self)
                if saved and extension.state_dict():  # state the snapshot just written lacks: a stop writes anew
                    self._saved_at = None
                self._pending.pop(0)
        finally:
            self._pending = None

    def _read_losses(self) -> None:
        """Read the unread iterations' losses (one host synchronisation), stop at the first that is not finite, and
        hand each iteration's to the extensions in order."""
        iterations = [iteration for iteration, _ in self._unread]
        for iteration, observation in zip(iterations, read_losses([losses for _, losses in self._unread])):
            bad = {k: v for k, v in observation.items() if not math.isfinite(v)}
            if bad:
                self.diverged(", ".join(f"{k}={v}" for k, v in bad.items()), iteration)
            for extension in self.extensions:
                extension.observe(observation)
        self._unread = []

    def _read_losses_after_a_failure(self) -> None:
        """Raise TrainingDiverged if the unread losses hold a NaN/Inf; if the device cannot even be read, the
        failure that brought us here says more."""
        try:
            self._read_losses()
        except TrainingDiverged:
            raise
        except RuntimeError:
            pass

    def diverged(self, what: str, iteration: int | None = None) -> None:
        raise TrainingDiverged(f"{what} at iteration {self.iteration if iteration is None else iteration}; stopped without writing a "
                               f"snapshot (last good one: {self.latest_good_snapshot() or 'none'})")

    def _request_stop(self, signum, frame) -> None:
        if self._stop_signal is not None:  # a second Ctrl-C means "now"
            raise KeyboardInterrupt
        self.request_stop(signum)
        self.acknowledge_stop(sys.stderr)

    @property
    def stop_requested(self) -> bool:
        return self._stop_signal is not None

    @property
    def stop_signal(self) -> int | None:
        """The signal that asked the run to stop (None: none did)."""
        return self._stop_signal

    def request_stop(self, signum: int) -> None:
        """Stop after the current iteration and write a snapshot (what Ctrl-C and SIGTERM do)."""
        self._stop_signal = signum

    def acknowledge_stop(self, stream) -> None:
        """Say at once, from the signal handler, that the run stops after this iteration (which with a due evaluation
        can take minutes: a second Ctrl-C would stop it without a snapshot). Straight to ``stream``'s file
        descriptor: a print from a handler that interrupted a print to the same file fails ("reentrant call"), an
        error raised in whatever the run was doing. Without a descriptor (captured output) ``advance`` says it."""
        if not self.world.is_main:
            return
        pending, name = self._pending, signal.Signals(self._stop_signal).name
        if pending is None:  # in an iteration's update
            doing = f"iteration {self.iteration + 1}"
        else:  # in iteration N's extensions: those still to run, e.g. a due evaluation, come first
            long = [extension.takes_long for extension in pending if extension.takes_long]
            doing = (f"{' and '.join(long)} at iteration {self.iteration} (it can take minutes)" if long else
                     f"iteration {self.iteration}")
        try:
            latest = checkpoint.snapshots_of(self.out)[-1:]
            if pending is not None and self._saved_at == self.iteration:
                text = (f"\n{name} received: finishing {doing}; its snapshot is written ({latest[0]}; a second one "
                        f"stops at once)\n")
            else:
                text = (f"\n{name} received: finishing {doing}, then writing a snapshot (a second one stops at once, "
                        f"without; the latest is {latest[0] if latest else 'none yet'})\n")
            os.write(stream.fileno(), text.encode())
        except (OSError, ValueError, IndexError):  # no descriptor, or closed; a folder that cannot be listed now
            pass

    def _stop_cleanly(self) -> None:
        written = self._saved_at == self.iteration  # by the Snapshot extension, before this iteration's evaluation
        if self.world.is_main:
            why = f"on {signal.Signals(self._stop_signal).name}" if self._stop_signal else "as another rank does"
            doing = "its snapshot is written" if written else "writing a snapshot"
            print(f"\nstopping {why}: {doing} at iteration {self.iteration}", flush=True)
        path = checkpoint.snapshot_path(self.out, self.iteration) if written else self.save_snapshot()
        # the time of the evaluations after a snapshot written before them, which a resume adds back
        self.log.event(self.iteration, "interrupted", snapshot=str(path), elapsed=round(self.elapsed, 2))
        if self.world.is_main:
            print(f"stopped at iteration {self.iteration}; resume with --resume {path}", flush=True)

    # -- snapshots -------------------------------------------------------------------------

    def save_snapshot(self) -> Path:
        """Write ``snapshot_iter_N.pt`` and the generator-only export (collective: call on every rank)."""
        # G's EMA too: updated after the ranks' buffers are made equal, it drifts per rank if ever updated before
        replicas = dict.fromkeys([self.updater.gen_module, self.updater.dis_module, self.updater.eval_generator])
        assert_replicas_identical(list(replicas), self.world)
        state = self.state_dict()
        bad = checkpoint.non_finite_weights(state)
        if bad:  # identical on every rank (the replicas were just checked), so all ranks stop here
            self.diverged(f"{len(bad)} tensors hold NaN/Inf (first: {bad[0]})")
        path = checkpoint.snapshot_path(self.out, self.iteration)
        if self.world.is_main:
            export = checkpoint.generator_export(state)
            try:  # the export first: a snapshot on disk always has its export beside it
                checkpoint.atomic_save(export, checkpoint.generator_path(self.out, self.iteration))
                checkpoint.atomic_save(state, path)
            except OSError as error:
                raise SnapshotWriteError(
                    f"could not write {path} ({error.strerror or first_line(error)}); nothing was lost: the earlier "
                    f"snapshots are intact (latest: {self.latest_good_snapshot() or 'none'})") from None
        self._saved_at = self.iteration
        return path

    def latest_good_snapshot(self) -> Path | None:
        return checkpoint.latest_good_snapshot(self.out)

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
            **({"gen_ema": updater.terms.ema.state_dict()} if updater.terms.ema is not None else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        updater = self.updater
        mismatches = [checkpoint.state_mismatch(name, module.state_dict(), state[name])
                      for name, module in (("gen", updater.gen_module), ("dis", updater.dis_module))]
        mismatches += [checkpoint.optimizer_mismatch(name, optimizer, state[name])
                       for name, optimizer in (("opt_gen", updater.opt_gen), ("opt_dis", updater.opt_dis))]
        if any(mismatches):
            raise checkpoint.SnapshotMismatch(next(m for m in mismatches if m))
        try:
            updater.gen_module.load_state_dict(state["gen"])
            updater.dis_module.load_state_dict(state["dis"])
            updater.opt_gen.load_state_dict(checkpoint.configured(state["opt_gen"], updater.opt_gen))
            updater.opt_dis.load_state_dict(checkpoint.configured(state["opt_dis"], updater.opt_dis))
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as error:  # of other networks,
            # or damaged (e.g. a list where torch expects a dict)
            raise checkpoint.SnapshotMismatch(first_line(error)) from None
        parts = [("updater", lambda: updater.load_state_dict(state["updater"])),
                 ("gen_ema", lambda: self._load_ema(state)),
                 ("data", lambda: updater.batches.load_state_dict(state["data"])),
                 ("extensions", lambda: self._load_extensions(state.get("extensions", {}))),
                 ("rng", lambda: self._restore_rng(state["rng"]))]
        for name, load in parts:
            try:
                load()
            except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as error:
                raise checkpoint.SnapshotError(f"the snapshot's '{name}' entry is damaged ({type(error).__name__}: "
                                               f"{first_line(error)})") from None
        self.elapsed_before = float(state.get("elapsed", 0.0))

    def _load_ema(self, state: dict) -> None:
        """G's EMA from the snapshot; a run that switches the EMA on at a resume starts it from G."""
        ema = self.updater.terms.ema
        if ema is not None:
            ema.load_state_dict(state["gen_ema"] if "gen_ema" in state else state["gen"])

    def _load_extensions(self, states: dict) -> None:
        for extension in self.extensions:
            extension.load_state_dict(states.get(type(extension).__name__, {}))

    def _restore_rng(self, states: list) -> None:
        if len(states) == self.world.size:
            checkpoint.restore_rng(states[self.world.rank], self.world.device)
        elif self.world.is_main:
            print(f"note: snapshot has RNG states of {len(states)} ranks, this run has {self.world.size}; "
                  f"global RNGs are re-seeded (latents and data order are unaffected)")
            checkpoint.seed_everything(self.updater.config.seed + self.world.rank + self.iteration)
