"""Extensions fired by the Trainer: log, progress bar, preview grid, snapshot.

Extensions that write files do so on rank 0 only; the snapshot extension is collective because
it gathers every rank's RNG state.
"""
from __future__ import annotations

import math
import time

import torch
from tqdm import tqdm

from source.files import atomic_write
from source.metrics.generate import eval_mode
from source.spectral.collapse import CollapseDetector, effective_rank, layer_scores
from source.spectral.gsr import class_sigmas
from source.spectral.spectra import compute_spectra, save_spectra
from source.training.distributed import broadcast_object, sum_over_ranks
from source.training.extension import Extension
from source.training.trainer import Trainer


class LogReport(Extension):
    """Mean of the losses since the last report -> console, ``log.jsonl`` and tensorboardX.

    ``it_per_s`` is the rate since the last report, whatever ran in between (an evaluation or a snapshot slows the
    line after it); ``eta_s`` extrapolates the rate of this process so far, in which they count as often as they
    came, rather than one interval's."""

    at_end = True

    def __init__(self, interval: int):
        self.interval = interval
        self._sums: dict[str, float] = {}
        self._count = 0  # iterations in the sums (restored on resume)
        self._timed = 0  # iterations run by this process since _last_time (the speed's numerator)
        self._last_time = time.perf_counter()
        self._first_time: float | None = None  # this process's first report: the ETA's rate counts from there
        self._since_first = 0  # iterations since then

    def observe(self, observation: dict[str, float]) -> None:
        for key, value in observation.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        self._count += 1
        self._timed += 1

    def __call__(self, trainer: Trainer) -> None:
        if self._count == 0:
            return
        now = time.perf_counter()
        speed = self._timed / max(now - self._last_time, 1e-9)
        left = trainer.stop - trainer.iteration
        if self._first_time is None:  # its interval holds the start-up and warm-up: no rate for an ETA yet (null)
            self._first_time, eta = now, 0.0 if left <= 0 else None
        else:
            self._since_first += self._timed
            eta = round(left / max(self._since_first / max(now - self._first_time, 1e-9), 1e-9), 1)
        record = {"iteration": trainer.iteration, "epoch": trainer.updater.batches.epoch,
                  "elapsed": round(trainer.elapsed, 2),
                  **{k: v / self._count for k, v in self._sums.items()},
                  **trainer.updater.learning_rates(),
                  "it_per_s": speed, "eta_s": eta}
        # images skipped so far by every rank's loader (each warns about its own one by one); a file met by two
        # ranks counts twice
        unreadable = sum_over_ranks(getattr(trainer.updater.batches.dataset, "n_unreadable", 0), trainer.world)
        if unreadable:
            record["unreadable_images"] = unreadable
        trainer.log.write(record)
        if trainer.world.is_main:
            tqdm.write(" ".join(_format(k, v) for k, v in record.items()))
        self._sums, self._count, self._timed, self._last_time = {}, 0, 0, now

    def state_dict(self) -> dict:
        """The losses observed since the last report, so a resumed run's next line averages the same iterations."""
        return {"sums": dict(self._sums), "count": self._count}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        sums, count = dict(state["sums"]), state["count"]
        if not (type(count) is int and count >= 0 and all(
                isinstance(key, str) and type(value) is float and math.isfinite(value) for key, value in sums.items())):
            raise ValueError("LogReport's sums and count are not finite loss sums and a count")
        self._sums, self._count = sums, count


class ProgressBar(Extension):
    reads_losses = False  # it fires every iteration: reading the losses then would synchronise every iteration

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._bar: tqdm | None = None

    def __call__(self, trainer: Trainer) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            # leave=False: the log lines stay, the bar goes (a finished bar was drawn once more on close)
            self._bar = tqdm(total=trainer.stop, initial=trainer.iteration - 1, unit="it", dynamic_ncols=True,
                             desc="train", mininterval=1.0, leave=False)
        self._bar.update(1)

    def finalize(self, trainer: Trainer) -> None:
        if self._bar is not None:
            self._bar.close()


class Preview(Extension):
    """A grid from fixed latents (one row per class shown), so successive grids are comparable."""

    at_end = True

    def __init__(self, interval: int, seed: int, rows: int = 10, columns: int = 10):
        self.interval = interval
        self.seed = seed
        self.rows, self.columns = rows, columns

    def __call__(self, trainer: Trainer) -> None:
        if not trainer.world.is_main:
            return
        images = self.samples(trainer.updater.eval_generator, trainer.world.device)
        folder = trainer.out / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        grid = (images + 1) / 2
        from torchvision.utils import save_image  # here: importing torchvision takes seconds, every train.py paid them

        for name in (f"preview_iter_{trainer.iteration:08d}.png", "latest.png"):
            atomic_write(folder / name, lambda handle: save_image(grid, handle, format="png", nrow=self.columns, padding=1))

    @torch.no_grad()
    def samples(self, gen: torch.nn.Module, device: torch.device) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        z = torch.randn(self.rows * self.columns, gen.dim_z, generator=generator).to(device)
        labels = None
        if gen.n_classes > 0:
            classes = torch.linspace(0, gen.n_classes - 1, self.rows).round().long()
            labels = classes.repeat_interleave(self.columns).to(device)
        with eval_mode(gen):  # running BN statistics, as the original's sampling
            return gen(z, labels).clamp(-1, 1).cpu()


class Snapshot(Extension):
    at_end = True

    def __init__(self, interval: int):
        self.interval = interval

    def __call__(self, trainer: Trainer) -> None:
        path = trainer.save_snapshot()
        if trainer.world.is_main:
            tqdm.write(f"snapshot -> {path}")


class Spectra(Extension):
    """SVD snapshot of every SN weight of D and G -> ``spectra/``; collapse scores -> log; collapse detection.

    Every rank computes the (identical) spectra so that all ranks agree on a detection; with
    ``apply_SR: auto`` a detection writes a snapshot and switches SR on from the next iteration.
    """

    at_end = True

    def __init__(self, interval: int, detector: CollapseDetector, auto_sr: bool):
        self.interval = interval
        self.detector = detector
        self.auto_sr = auto_sr

    def __call__(self, trainer: Trainer) -> None:
        gen, dis = compute_spectra(trainer.updater.gen_module), compute_spectra(trainer.updater.dis_module)
        if trainer.world.is_main:
            save_spectra(trainer.out, trainer.iteration, gen, dis)
        # rank 0's scores on every rank: GPU SVDs may differ in the last digits between ranks, and a collapse that one
        # rank alone detected would send it alone into apply_SR: auto's snapshot, a collective (NCCL hangs there)
        conv_scores = broadcast_object({name: score for name, score in layer_scores(dis).items()
                                        if dis[name].kind == "conv"}, trainer.world)
        record = {"iteration": trainer.iteration,
                  "collapse_score/dis/min": min(conv_scores.values()),
                  "collapse_score/dis/mean": sum(conv_scores.values()) / len(conv_scores)}
        for name, score in conv_scores.items():
            record[f"collapse_score/dis/{name}"] = score
            record[f"effective_rank/dis/{name}"] = effective_rank(dis[name].singular_values)
        trainer.log.write(record)
        collapsed = self.detector.update(trainer.iteration, conv_scores)
        if collapsed:
            self._report_collapse(trainer, collapsed, conv_scores)

    def _report_collapse(self, trainer: Trainer, layers: list[str], scores: dict[str, float]) -> None:
        details = ", ".join(f"{name} {scores[name]:.3f} (peak {self.detector.peaks[name][0]:.3f} at "
                            f"{self.detector.peaks[name][1]})" for name in layers)
        trainer.log.event(trainer.iteration, "collapse", layers=layers, scores={n: scores[n] for n in layers})
        if trainer.world.is_main:
            tqdm.write(f"\n{'!' * 80}\nSPECTRAL COLLAPSE at iteration {trainer.iteration}: {len(layers)} D layer(s) "
                       f"below {self.detector.threshold} x their running max: {details}\n{'!' * 80}")
        if self.auto_sr and not trainer.updater.apply_SR:
            # Switched on before the snapshot, so that resuming it continues exactly this run; SR has not
            # acted yet, so `--set updater.apply_SR=false` on it gives the run without SR.
            trainer.updater.apply_SR = True
            path = trainer.save_snapshot()
            trainer.log.event(trainer.iteration, "sr_start", mode=trainer.updater.config.updater.sr.mode,
                              reason="auto", snapshot=str(path))
            if trainer.world.is_main:
                tqdm.write(f"apply_SR: auto -> SR switched on after iteration {trainer.iteration} "
                           f"(snapshot at the detection, before SR acted: {path})")

    def state_dict(self) -> dict:
        return {"detector": self.detector.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.detector.load_state_dict(state["detector"])


class ClassSpectra(Extension):
    """Per class, sigma_max of G's grouped class-conditional gains and biases -> ``class_spectra.jsonl``.

    The gSR paper's "spectral explosion" measure, exact (SVD of each small grouped matrix), for baselines
    too; ``python -m figures.class_spectra RUN`` draws it. The log (and tensorboard) gets each shown class's
    maximum over layers: every class up to 20, else the 10 most and 10 least frequent.
    """

    at_end = True
    FILE = "class_spectra.jsonl"
    LOGGED_CLASSES = 20

    def __init__(self, interval: int, class_counts: list[int]):
        self.interval = interval
        self.class_counts = list(class_counts)
        order = sorted(range(len(self.class_counts)), key=lambda y: -self.class_counts[y])
        half = self.LOGGED_CLASSES // 2
        self.logged = order if len(order) <= self.LOGGED_CLASSES else order[:half] + order[-half:]

    def __call__(self, trainer: Trainer) -> None:
        sigmas = class_sigmas(trainer.updater.gen_module)
        if not sigmas or not trainer.world.is_main:
            return
        gamma = [gain for gain, _ in sigmas.values()]
        beta = [bias for _, bias in sigmas.values()]
        trainer.log.write({"iteration": trainer.iteration, "class_counts": self.class_counts, "layers": list(sigmas),
                           "gamma": gamma, "beta": beta}, file=self.FILE)
        record = {"iteration": trainer.iteration}
        for y in self.logged:
            record[f"class_sigma/gain/{y}"] = max(layer[y] for layer in gamma)
            record[f"class_sigma/bias/{y}"] = max(layer[y] for layer in beta)
        trainer.log.write(record)


class WatchWeights(Extension):
    """Stops at NaN/Inf weights and warns once when weights explode.

    The losses of every iteration are checked (when the trainer reads them), but they come before the optimizer
    step that can break the weights; this catches the weights themselves (and every snapshot checks them again
    before it is written).
    """

    EXPLODING = 1e6  # SN makes the raw scale irrelevant to D's function, but Adam at an absurd lr drives it here

    def __init__(self, interval: int):
        self.interval = interval
        self.warned = False

    def __call__(self, trainer: Trainer) -> None:
        params = [p.detach() for m in (trainer.updater.gen_module, trainer.updater.dis_module) for p in m.parameters()]
        largest = float(torch.stack([p.abs().max() for p in params]).max())
        if not math.isfinite(largest):
            trainer.diverged(f"weights hold NaN/Inf (largest |w| = {largest})")
        if largest > self.EXPLODING and not self.warned:
            self.warned = True
            trainer.log.event(trainer.iteration, "weights_exploding", max_abs_weight=largest)
            if trainer.world.is_main:
                tqdm.write(f"WARNING: weights are exploding at iteration {trainer.iteration}: largest |w| = {largest:.3g} "
                           f"(> {self.EXPLODING:g}); check the learning rates (adam_G.alpha, adam_D.alpha)")


def _format(key: str, value) -> str:
    if key == "eta_s":
        return f"eta={'(from the next line)' if value is None else _duration(value)}"
    if isinstance(value, float):
        return f"{key}={value:.4g}"
    return f"{key}={value}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
