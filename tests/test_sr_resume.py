"""The SRGANs story end to end: an SN run's snapshot resumed with SR keeps D's spectrum above its envelope."""
import json

import numpy as np

import train
from source.spectral.spectra import list_spectra, load_spectra
from test_training import tiny_argv


def test_sn_snapshot_resumed_with_sr_keeps_the_spectrum_above_its_envelope(tmp_path, capsys):
    sn = tmp_path / "sn"
    assert train.main(tiny_argv(sn, 4, "updater.apply_SR=false", "spectra_interval=1")) == 0
    resume = ["--resume", str(sn / "snapshots" / "snapshot_iter_4.pt")]
    argv = tiny_argv(tmp_path / "unused", 9, "updater.apply_SR=true", "updater.sr.interval=1", "spectra_interval=1")
    argv = argv[:2] + argv[4:] + resume  # drop --out: the changed config branches into sn-resume4
    assert train.main(argv) == 0
    assert "updater.apply_SR: false -> true" in capsys.readouterr().out
    branch = tmp_path / "sn-resume4"

    spectra = {it: load_spectra(path).nets["dis"] for it, path in list_spectra(branch)}
    assert sorted(spectra) == [5, 6, 7, 8, 9], "spectra continue from the snapshot's iteration"
    # SR's first call (after the D step of iteration 5) only records, so spectra at 5 are the envelope's start.
    recorded = {name: s.normalized for name, s in spectra[5].items() if s.kind == "conv"}
    for iteration in (6, 7, 8, 9):
        for name, start in recorded.items():
            now = spectra[iteration][name].normalized
            assert np.all(now >= start - 1e-6), f"{name} fell below its envelope at iteration {iteration}"
    raised = sum(np.sum(spectra[9][n].normalized > r + 1e-4) for n, r in recorded.items())
    assert raised > 0, "D's updates must have pushed some values above the recorded spectrum"

    records = [json.loads(line) for line in (branch / "log.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "resumed" and records[0]["iteration"] == 4
    assert "updater.apply_SR: false -> true" in records[0]["changes"]
    assert min(r["iteration"] for r in records if "loss_dis" in r) == 5
