"""The Modes extension: the collapse study's classifier measures of G every ``evaluation.modes_interval``.

Rank 0 samples ``evaluation.modes_samples`` images at fixed latents from the generator evaluation uses
(G's EMA when the run keeps one) and writes what the small Fashion-MNIST classifier reads in them
(``source/metrics/classifier_modes.py``: modes, entropy, diversity, classifier FID/KID) to ``classifier_modes.jsonl``
(not ``modes.jsonl``, where ``figures.collapse`` caches its pixel nearest-neighbour measures).
The classifier and the real reference (the data set's test split, else its training data) load on the
first call; a problem there turns the measures off loudly instead of ending the run, as evaluation does.
"""
from __future__ import annotations

import time

from tqdm import tqdm

from source.config import Config
from source.datasets import DatasetError
from source.metrics.class_table import classifier_real_data
from source.metrics.classifier import DEFAULT_WEIGHTS, ClassifierUnavailable, check_generator, load_classifier
from source.metrics.classifier_modes import MIN_SHARE, RealReference, generator_modes
from source.metrics.generate import g_batchnorm, generation_mode
from source.training.extension import Extension
from source.training.trainer import Trainer

MODES_ERRORS = (ClassifierUnavailable, DatasetError, OSError)


class Modes(Extension):
    at_end = True
    takes_long = "the classifier's mode measures"
    FILE = record_file = "classifier_modes.jsonl"

    def __init__(self, interval: int, config: Config):
        self.interval = interval
        self.config = config
        self.settings = config.evaluation
        self._classifier = None
        self._reference: RealReference | None = None
        self._real_name = ""
        self._disabled = False
        self._batchnorm = g_batchnorm(self.settings)

    def __call__(self, trainer: Trainer) -> None:
        if not trainer.world.is_main or self._disabled:
            return
        gen, device = trainer.updater.eval_generator, trainer.world.device
        started = time.perf_counter()  # the first call's loading of the classifier and real images included
        if self._reference is None and not self._prepare(trainer, gen):
            return
        with generation_mode(gen, self._batchnorm, device):  # G comes back unchanged
            record = generator_modes(gen, self._classifier, self._reference, self.settings.modes_samples,
                                     self.config.seed, self.settings.batch_size, device)
        record = {"iteration": trainer.iteration, **record, "protocol": self._protocol()}
        trainer.log.write(record, file=self.FILE)
        tqdm.write(f"modes at iteration {trainer.iteration} ({time.perf_counter() - started:.1f} s): "
                   f"{record['modes']} modes, entropy {record['entropy']:.2f}, diversity {record['diversity']:.2f}, "
                   f"classifier FID {record['classifier_FID']:.1f}")

    def _prepare(self, trainer: Trainer, gen) -> bool:
        try:
            self._classifier, _ = load_classifier(DEFAULT_WEIGHTS, trainer.world.device)
            check_generator(gen, self._classifier, trainer.world.device, unconditional=True)
            real, self._real_name, notes = classifier_real_data(self.config)
            self._reference = RealReference.of(self._classifier, real)
        except MODES_ERRORS as error:
            self._disabled = True
            trainer.log.event(trainer.iteration, "modes_disabled", reason=str(error))
            tqdm.write(f"\n{'!' * 80}\nMODE MEASURES OFF from iteration {trainer.iteration}: {error}\n{'!' * 80}")
            return False
        for note in notes:
            tqdm.write(f"modes: {note}")
        return True

    def _protocol(self) -> dict:
        return {"samples": self.settings.modes_samples, "latent_seed": self.config.seed,
                "real": self._real_name, "real_images": len(self._reference.labels), "min_share": MIN_SHARE,
                "generator": "ema" if self.config.updater.ema.enabled else "raw", **self._batchnorm.record(),
                "classifier": DEFAULT_WEIGHTS.rsplit("/", 1)[-1]}
