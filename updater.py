"""One training iteration, as SRGANs' ``update_core``: D step, SR, G step, then the other n_dis - 1 D steps (+ SR).

The global batch (``batchsize`` real and as many fake images for D, ``gen_batch`` fakes for G) is
built from micro-batches of ``micro_batchsize`` by gradient accumulation, split over DDP ranks, so
one optimizer step sees the same batch on 1 or N processes. G's BatchNorm statistics are those of
one micro-batch, as in the original. The latents of a global batch are drawn from a generator
seeded by (seed, iteration, phase) and sliced like the data (``source/training/phases.py``): reproducible
after a resume, and the same samples whatever the world size and accumulation.

Where each training term happens (each optional, see ``Terms``):
- DiffAugment: ``_augment``, on every image D sees (real and fake in D's step, fake in G's step);
- LeCam: in ``_dis_step``, added to D's loss; its anchors follow each D step (``lecam.end_step``);
- SR: ``_regularize``, right after every D optimizer step (so before the G step);
- gSR: in ``_gen_step``, added to G's loss once per G step (with the last micro-batch);
- EMA of G: at the end of ``update``, after the ranks' buffers have been made equal;
- the original's resume artefact (opt-in, ``source/training/resume_artefact.py``): ``_generate``/``_discriminate``.
Mixed precision, channels_last and compilation (``config.performance``) change how the forwards run
(``source/training/performance.py``), not this order; the losses are computed in fp32. With step graphs each
``_dis_update``/``_gen_update`` is replayed as one CUDA graph on the inputs its ``_dis_step``/``_gen_step``
prepared (``source/training/step_graphs.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from source.config import Config
from source.links import power_iteration
from source.regularizers import DiffAugment, GeneratorEMA, LeCam
from source.regularizers.losses import LOSSES
from source.spectral.gsr import GroupSpectralRegularizer
from source.training import performance
from source.training.distributed import World, all_reduce_mean, broadcast_buffers, ddp_sync, unwrap
from source.training.phases import G_PHASE, PhaseDraws
from source.training.resume_artefact import ResumeArtefact
from source.training.schedule import linear_shift, set_learning_rate
from source.training.step_graphs import StepGraphs


@dataclass
class Terms:
    """The optional training terms besides the adversarial loss and SR (None: off)."""
    augment: DiffAugment | None = None
    lecam: LeCam | None = None
    gsr: GroupSpectralRegularizer | None = None
    ema: GeneratorEMA | None = None
    label_prior: torch.Tensor | None = None  # G's labels follow these class frequencies (None: uniform)


class Updater:
    def __init__(self, gen: nn.Module, dis: nn.Module, opt_gen: torch.optim.Optimizer,
                 opt_dis: torch.optim.Optimizer, batches: Iterator, config: Config, world: World,
                 regularizer: Callable[[nn.Module, int], bool] | None = None, terms: Terms | None = None):
        self.gen, self.dis = gen, dis
        self.opt_gen, self.opt_dis = opt_gen, opt_dis
        self.batches = batches
        self.config = config
        self.world = world
        self.regularizer = regularizer
        self.terms = terms or Terms()
        self.loss_dis, self.loss_gen = LOSSES[config.updater.loss_type]
        self.accumulation = config.accumulation_steps(world.size)
        self.gen_accumulation = config.accumulation_steps(world.size, config.gen_batch)
        self.iteration = 0
        self.apply_SR = config.updater.apply_SR is True  # "auto" starts off; the collapse detector turns it on
        self.scaler_dis = performance.grad_scaler(config.performance, world.device)
        self.scaler_gen = performance.grad_scaler(config.performance, world.device)
        self.memory_format = performance.memory_format(config.performance)
        # compile's CUDA graphs reuse their outputs' memory at the next replay, so gradients accumulate into buffers
        # kept outside them (a step graph holds the whole step, zeroing to Adam: its gradients are its own)
        self.stable_grads = performance.compiled_graphs(config.performance)
        self.graphs = StepGraphs(world.device) if config.performance.step_graphs else None
        self.draws = PhaseDraws(config.seed, world.device, self.terms.augment, self.terms.label_prior)
        self.artefact: ResumeArtefact | None = None  # train.py sets it for the first iteration after some resumes

    def _autocast(self):
        return performance.autocast(self.config.performance, self.world.device)

    @property
    def gen_module(self) -> nn.Module:
        return unwrap(self.gen)

    @property
    def dis_module(self) -> nn.Module:
        return unwrap(self.dis)

    @property
    def eval_generator(self) -> nn.Module:
        """The generator that evaluation, previews and exports use: G's EMA when it is on, else G."""
        return self.terms.ema.module if self.terms.ema is not None else self.gen_module

    def update(self) -> dict[str, torch.Tensor]:
        """Run one iteration and return its losses (means over the global batch) as 0-d tensors on the device.

        Reading them is a host synchronisation; the trainer reads many iterations' at once (``read_losses``), so
        the host keeps queueing work ahead of a GPU that the small models keep busy only that way."""
        self._set_learning_rates()
        dis_losses = torch.zeros(2, device=self.world.device)  # adversarial, LeCam: means over the D steps
        gen_losses = torch.zeros(2, device=self.world.device)  # adversarial, gSR
        d_first = self.config.updater.order == "d_first"
        if not d_first:
            gen_losses = self._gen_step()
        for step in range(self.config.updater.n_dis):
            dis_losses += self._dis_step(step) / self.config.updater.n_dis
            self._regularize()
            self._sync_artefact("dis")  # after SR, as the original's copyparams
            if d_first and step == 0:  # SRGANs: G's step sits inside the D loop, after the first D step
                gen_losses = self._gen_step()
        self.iteration += 1
        broadcast_buffers((self.gen_module, self.dis_module), self.world)
        if self.terms.ema is not None:
            self.terms.ema.update(self.gen_module, self.iteration - 1)
        losses = all_reduce_mean(torch.cat([dis_losses, gen_losses]), self.world)
        loss_dis, loss_lecam, loss_gen, loss_gsr = losses.unbind()
        record = {"loss_dis": loss_dis, "loss_gen": loss_gen}
        if self.terms.lecam is not None:
            record["loss_lecam"] = loss_lecam
        if self.terms.gsr is not None:
            record["loss_gsr"] = loss_gsr
        return record

    def _dis_step(self, step: int) -> torch.Tensor:
        """One D update; returns (its adversarial loss, its LeCam penalty), means over the global batch."""
        z, labels = self.draws.latents(self.gen_module, self.iteration, step, self.config.batchsize)
        reals = (tuple(t.to(self.world.device, non_blocking=True) for t in next(self.batches))
                 for _ in range(self.accumulation))  # read as the micro-batches go (a graph needs them all first)
        inputs = {"z": z, "labels": labels,  # DiffAugment's draws: the reals at 0..B-1, the fakes at B..2B-1
                  "augmentation": self.draws.augmentation(self.iteration, step, 2 * self.config.batchsize),
                  "reals": reals if self.graphs is None else list(reals),
                  "iteration": torch.full((), self.iteration, device=self.world.device)
                  if self.terms.lecam is not None else None}
        losses = self._run("dis", self._dis_update, inputs)
        if self.terms.lecam is not None:
            self.terms.lecam.end_step(self.iteration, self.world)
        return losses

    def _dis_update(self, inputs: dict) -> torch.Tensor:
        """D's step on this phase's ``inputs`` (latents, labels, DiffAugment's draws, real micro-batches)."""
        performance.zero_grad(self.opt_dis, self.stable_grads)
        total = torch.zeros(2, device=self.world.device)
        batchsize, lecam = self.config.batchsize, self.terms.lecam
        for micro, (real, real_labels) in enumerate(inputs["reals"]):
            part = self._micro_slice(micro)
            fake_labels = None if inputs["labels"] is None else inputs["labels"][part]
            with torch.no_grad(), power_iteration((self.gen_module,), enabled=micro == 0), self._autocast():
                fake = self._generate(self.gen_module, inputs["z"][part], fake_labels)
            labels = None if fake_labels is None else torch.cat([real_labels, fake_labels])
            positions = self._positions(part)  # of the reals; the fakes' are B further
            images = self._augment(torch.cat([real.to(fake.dtype), fake]), inputs["augmentation"],
                                   torch.cat([positions, positions + batchsize]))
            with ddp_sync(self.dis, micro == self.accumulation - 1), \
                    power_iteration((self.dis_module,), enabled=micro == 0):
                # One D call on real+fake: one SN power step; D has no BatchNorm, so it equals two calls.
                with self._autocast():
                    logits = self._discriminate(self.dis, images, labels, halves=2)
                logits_real, logits_fake = logits.float().chunk(2)
                loss = self.loss_dis(logits_real, logits_fake)
                penalty = (lecam.penalty(logits_real, logits_fake, part, inputs["iteration"]) if lecam
                           else loss.new_zeros(()))
                self.scaler_dis.scale((loss + penalty) / self.accumulation).backward()
            total += torch.stack([loss.detach(), penalty.detach()])
        self._step(self.opt_dis, self.scaler_dis, "dis")
        return total / self.accumulation

    def _gen_step(self) -> torch.Tensor:
        """One G update; returns (its adversarial loss, its gSR penalty), means over the global batch."""
        z, labels = self.draws.latents(self.gen_module, self.iteration, G_PHASE, self.config.gen_batch)
        inputs = {"z": z, "labels": labels,
                  "augmentation": self.draws.augmentation(self.iteration, G_PHASE, self.config.gen_batch)}
        losses = self._run("gen", self._gen_update, inputs)
        self._sync_artefact("gen")
        return losses

    def _gen_update(self, inputs: dict) -> torch.Tensor:
        """G's step on this phase's ``inputs`` (latents, labels, DiffAugment's draws)."""
        performance.zero_grad(self.opt_gen, self.stable_grads)
        total = torch.zeros(2, device=self.world.device)
        dis = self.dis_module.requires_grad_(False)  # only G's gradients are needed here
        try:
            for micro in range(self.gen_accumulation):
                part = self._micro_slice(micro)
                labels = None if inputs["labels"] is None else inputs["labels"][part]
                last = micro == self.gen_accumulation - 1
                with ddp_sync(self.gen, last), \
                        power_iteration((self.gen_module, dis), enabled=micro == 0):
                    with self._autocast():
                        fake = self._augment(self._generate(self.gen, inputs["z"][part], labels),
                                             inputs["augmentation"], self._positions(part))
                        logits = self._discriminate(dis, fake, labels, halves=1)
                    loss = self.loss_gen(logits.float())
                    # gSR once per G step, with the micro-batch whose backward DDP synchronizes
                    penalty = self.terms.gsr(self.gen_module) if self.terms.gsr and last else loss.new_zeros(())
                    self.scaler_gen.scale(loss / self.gen_accumulation + penalty).backward()
                total += torch.stack([loss.detach() / self.gen_accumulation, penalty.detach()])
        finally:
            dis.requires_grad_(True)
        self._step(self.opt_gen, self.scaler_gen, "gen")
        return total

    def _run(self, name: str, update: Callable[[dict], torch.Tensor], inputs: dict) -> torch.Tensor:
        """``update(inputs)``, or with ``performance.step_graphs`` its CUDA graph replayed on these inputs (not in
        the resume artefact's one iteration: its replicas are another computation)."""
        if self.graphs is None or self.artefact is not None:
            return update(inputs)
        return self.graphs.run(name, update, inputs)

    def _generate(self, gen: nn.Module, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return gen(z, labels) if self.artefact is None else self.artefact.generate(gen, z, labels)

    def _discriminate(self, dis: nn.Module, images: torch.Tensor, labels: torch.Tensor | None,
                      halves: int) -> torch.Tensor:
        """D's logits of ``images`` (``halves`` = 2: reals then fakes); with the resume artefact, each device's
        part of each half goes through its own D."""
        if self.artefact is None:
            return dis(images, labels)
        return self.artefact.discriminate(dis, images, labels, halves)

    def _step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, which: str) -> None:
        """The optimizer step of G or D ("gen"/"dis"); with fp16 loss scaling, unscaled first and skipped when
        gradients overflowed; with the resume artefact, the replicas' gradients are added first."""
        if self.artefact is not None:
            self.artefact.add_gradients(self._network(which), which)
        scaler.step(optimizer)
        scaler.update()

    def _sync_artefact(self, which: str) -> None:
        """The resume artefact's replicas of G or D take its weights; once both have, the artefact is over."""
        if self.artefact is not None and self.artefact.sync(self._network(which), which):
            self.artefact = None

    def _network(self, which: str) -> nn.Module:
        return self.gen_module if which == "gen" else self.dis_module

    def _regularize(self) -> None:
        """Spectral regularization of D's raw weights, after its optimizer step (SRGANs updater.py L145-149)."""
        if self.apply_SR and self.regularizer is not None:
            self.regularizer(self.dis_module, self.iteration)

    def _augment(self, images: torch.Tensor, augmentation: dict | None, positions: torch.Tensor) -> torch.Tensor:
        """Augment ``images``, which hold the phase's samples at ``positions``; then D's memory format."""
        if augmentation is not None:
            images = self.terms.augment.apply(images, augmentation, positions)
        return images.contiguous(memory_format=self.memory_format)

    def _positions(self, part: slice) -> torch.Tensor:
        return torch.arange(part.start, part.stop, device=self.world.device)

    def _micro_slice(self, micro: int) -> slice:
        """Rank r's micro-batch k holds global samples (k*W + r)*m ... +m, like the data iterator's shards."""
        start = (micro * self.world.size + self.world.rank) * self.config.micro_batchsize
        return slice(start, start + self.config.micro_batchsize)

    def _set_learning_rates(self) -> None:
        for optimizer, adam in ((self.opt_gen, self.config.adam_G), (self.opt_dis, self.config.adam_D)):
            set_learning_rate(optimizer, linear_shift(adam.alpha, self.iteration, self.config.iteration_decay_start,
                                                      self.config.iteration))

    def learning_rates(self) -> dict[str, float]:
        return {"lr_G": float(self.opt_gen.param_groups[0]["lr"]), "lr_D": float(self.opt_dis.param_groups[0]["lr"])}

    def state_dict(self) -> dict:
        state = {"iteration": self.iteration, "apply_SR": self.apply_SR}
        if self.regularizer is not None:
            state["sr"] = self.regularizer.state_dict()
        if self.scaler_dis.is_enabled():
            state["grad_scalers"] = {"dis": self.scaler_dis.state_dict(), "gen": self.scaler_gen.state_dict()}
        for name in ("lecam", "gsr"):
            if getattr(self.terms, name) is not None:
                state[name] = getattr(self.terms, name).state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.iteration = state["iteration"]
        if self.config.updater.apply_SR == "auto":
            self.apply_SR = state["apply_SR"]  # an explicit true/false on the command line wins
        if self.regularizer is not None and "sr" in state:
            self.regularizer.load_state_dict(state["sr"])
            self.regularizer.check_envelopes(self.dis_module)
        if self.scaler_dis.is_enabled() and "grad_scalers" in state:  # else: fp16 starts here, at the initial scale
            self.scaler_dis.load_state_dict(state["grad_scalers"]["dis"])
            self.scaler_gen.load_state_dict(state["grad_scalers"]["gen"])
        if self.terms.lecam is not None and "lecam" in state:  # else: LeCam starts here, from zero anchors
            self.terms.lecam.load_state_dict(state["lecam"])
        if self.terms.gsr is not None and "gsr" in state:  # else: gSR starts here, with fresh vectors
            self.terms.gsr.load_state_dict(state["gsr"], self.world.device)
