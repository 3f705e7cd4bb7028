"""figures.collapse_study: the study's summary over seeds and its curves, from run folders written here."""
import json
from pathlib import Path

import pytest
import yaml

from figures import collapse_study
from figures.common import command_line
from source.study import state

ROOT = Path(__file__).resolve().parents[1]


def write(folder: Path, name: str, records: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))


def measures(iteration: int, modes: int, diversity: float, fid: float) -> dict:
    return {"iteration": iteration, "modes": modes, "diversity": diversity, "classifier_FID": fid, "entropy": 2.0}


@pytest.fixture
def study(tmp_path):
    spec = {"base": str(ROOT / "configs/collapse/fmnist_cifar_recipe_ch32.yaml"), "seeds": [0, 1], "set": [],
            "settings": {"b64": []}, "arms": {"sn": {}, "sr_resumed": {"branch": "sn", "set": ["updater.apply_SR=true"]}}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    runs = tmp_path / "runs" / "b64"
    scores = lambda values: [{"iteration": 10 * (i + 1), "collapse_score/dis/mean": v} for i, v in enumerate(values)]  # noqa: E731
    losses = [{"iteration": it, "loss_dis": 1.0} for it in (10, 20, 30, 40)]
    write(runs / "sn_s0", "log.jsonl", losses + scores([0.8, 0.8, 0.3, 0.2]) +
          [{"iteration": 30, "event": "collapse", "layers": ["block4.c2"]}])
    write(runs / "sn_s0", "classifier_modes.jsonl", [measures(10, 10, 0.9, 50), measures(20, 9, 0.8, 60),
                                          measures(30, 3, 0.3, 200), measures(40, 2, 0.2, 300)])
    write(runs / "sn_s1", "log.jsonl", losses + scores([0.8, 0.82, 0.84, 0.85]))
    write(runs / "sn_s1", "classifier_modes.jsonl", [measures(20, 10, 1.0, 40)])  # a seed still running
    write(runs / "sr_resumed_s0", "log.jsonl", [{"iteration": 20, "event": "resumed"},
                                                {"iteration": 20, "event": "sr_start", "mode": "dynamic"},
                                                {"iteration": 30, "loss_dis": 1.0}, {"iteration": 40, "loss_dis": 1.0},
                                                *scores([0.8, 0.8, 0.8, 0.8])[2:]])
    write(runs / "sr_resumed_s0", "classifier_modes.jsonl", [measures(30, 9, 0.8, 70), measures(40, 9, 0.85, 65)])
    write(tmp_path / "runs", "chunks.jsonl", [  # a chunk the two sn runs ran in; a later one whose runs did not start
        {"started": "2026-11-28T05:59:38", "wall_s": 12.5, "per_process": 2, "machine": {"device": "NVIDIA H200"},
         "code": {"commit": "0123456789abcdef0123456789abcdef01234567", "dirty": True, "from": "carry"},
         "runs": {"b64/sn_s0": {"from": 0, "to": 30, "seconds": 12.0}, "b64/sn_s1": {"from": 0, "to": 20}}},
        {"started": "2026-11-28T06:10:00", "wall_s": 3.0, "runs": {"b64/sr_resumed_s0": {"from": 20},
                                                                   "b64/sr_resumed_s1": {"from": 20, "to": 0}}}])
    return path


def test_summary_per_arm_over_seeds_with_branches_joined_to_their_parents(study, tmp_path, capsys):
    out = tmp_path / "report"
    summary = collapse_study.main([str(study), "--root", str(tmp_path / "runs"), "--out", str(out)])
    sn = summary["arms"]["b64/sn"]
    assert sn["collapses"] == [30, None] and sn["collapse_iteration"] == {"mean": 30.0, "std": None, "n": 1}
    assert sn["reached"] == [40, 40] and sn["common_iteration"] == 20  # seed 1 measured up to 20 so far
    assert sn["at_common"]["modes"] == {"mean": 9.5, "std": pytest.approx(0.5 ** 0.5), "n": 2}  # 9 and 10, at 20
    assert sn["before_collapse"]["modes"] == {"mean": 9.0, "std": None, "n": 1}  # seed 0 before its collapse at 30
    resumed = summary["runs"]["b64/sr_resumed_s0"]
    assert resumed["branched_at"] == 20 and resumed["sr_start"] == 20
    assert [m["iteration"] for m in resumed["measures"]] == [10, 20, 30, 40]  # the parent's 10 and 20 in front
    assert summary["runs"]["b64/sr_resumed_s1"]["reached"] == 0  # never started: its parent did not collapse
    branch = summary["arms"]["b64/sr_resumed"]
    assert (branch["started"], branch["common_iteration"], branch["at_common"]["modes"]["n"]) == (1, 40, 1)
    table = capsys.readouterr().out
    assert "| b64/sn | 40, 40 | 1 of 2 (30) | 20 | 9.5 ± 0.7 (n=2) | 0.90 ± 0.14 (n=2) | 50.0 ± 14.1 (n=2) | " \
           "9.0 (n=1) | 0.80 (n=1) |" in table
    assert "| b64/sr_resumed | 40 (from 20), 0 | 0 of 1; 1 not started | 40 | 9.0 (n=1) |" in table
    assert (out / "study_b64_curves.png").stat().st_size > 10_000
    assert json.loads((out / "data" / "study_summary.json").read_text())["arms"]["b64/sn"]["collapses"] == [30, None]
    assert [(c["runs"], c["iterations"], c["iterations_per_s"]) for c in summary["chunks"]] == [(2, 50, 4.0),
                                                                                            (0, 0, 0.0)]
    assert [(c["device"], c["code"]) for c in summary["chunks"]] == [
        ("NVIDIA H200", "commit 0123456 with local changes (carried)"), (None, None)]  # the second names neither
    assert state.chunk_code({"code": {"commit": "0123456 on a machine of mine", "dirty": False}}) is None
    assert state.chunk_device({"machine": {"device": "NVIDIA H200\n" * 3}}) is None  # one-line messages stay so
    assert "chunk of 2026-11-28T05:59:38 on NVIDIA H200 with commit 0123456 with local changes (carried): 2 runs " \
           "trained 50 iterations in 12.5 s (4.0 iterations/s in all)" in table


def test_the_spectra_figure_sets_the_baseline_beside_its_branch_once_started(study, tmp_path, monkeypatch):
    """The fig3/fig4 analogue: seed 0's baseline and its SR branch (not seed 1's runs); only the baseline while the
    branch has no spectra; none without spectra."""
    import numpy as np

    from source.spectral.spectra import LayerSpectrum, save_spectra

    runs, out = tmp_path / "runs" / "b64", tmp_path / "report"
    drawn = []
    monkeypatch.setattr(collapse_study, "spectra_figure", lambda runs, *rest: drawn.append(
        [run.name for run in runs]) or collapse_study.plt.figure())
    collapse_study.main([str(study), "--root", str(tmp_path / "runs"), "--out", str(out)])
    assert drawn == [] and not (out / "study_b64_spectra.png").exists()
    conv = {"block1.c1": LayerSpectrum("conv", np.array([2.0, 1.0, 0.5]), 2.0)}
    for folder, iterations in (("sn_s0", (10, 20, 30)), ("sn_s1", (10,)), ("sr_resumed_s0", (30, 40))):
        for iteration in iterations:
            save_spectra(runs / folder, iteration, {}, conv)
    collapse_study.main([str(study), "--root", str(tmp_path / "runs"), "--out", str(out)])
    assert drawn == [["sn_s0", "sr_resumed_s0"]] and (out / "study_b64_spectra.png").is_file()
    for path in (runs / "sr_resumed_s0" / "spectra").iterdir():
        path.unlink()
    collapse_study.main([str(study), "--root", str(tmp_path / "runs"), "--out", str(out)])
    assert drawn[-1] == ["sn_s0"]


def test_a_missing_study_folder_is_a_one_line_error(study, tmp_path, capsys):
    assert command_line(collapse_study.main, [str(study), "--root", str(tmp_path / "nowhere")]) == 2
    assert "does not exist; run the study first" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()  # what a carry's lock leaves: its report of nothing replaced docs/collapse's
    assert command_line(collapse_study.main, [str(study), "--root", str(tmp_path / "empty")]) == 2
    assert "holds no chunk of the study yet; nothing written" in capsys.readouterr().err
    assert list((tmp_path / "empty").iterdir()) == []


def test_a_run_stopped_before_its_first_log_line_counts_as_started(study, tmp_path, capsys):
    """A chunk that stops a run at iteration 7 leaves a snapshot there and no loss line yet (every 100): the report
    says 7, as the study's status does, not 'not started'."""
    snapshots = tmp_path / "runs" / "b64" / "sr_resumed_s1" / "snapshots"
    snapshots.mkdir(parents=True)
    (snapshots / "snapshot_iter_7.pt").write_bytes(b"")  # only its name is read
    summary = collapse_study.main([str(study), "--root", str(tmp_path / "runs")])  # into the study folder's figures
    assert [p.name for p in (tmp_path / "runs" / "figures" / "data").iterdir()] == [f"{study.stem}_summary.json"]
    assert summary["arms"]["b64/sr_resumed"]["reached"] == [40, 7]
    assert "| b64/sr_resumed | 40 (from 20), 7 | 0 of 2 | 40 | 9.0 (n=1) |" in capsys.readouterr().out


def test_a_collapse_logged_past_what_the_run_reached_is_a_damaged_log(study, tmp_path, capsys):
    """A received log's collapse at 10^15, for a run at iteration 40, counted in the report (and would start a
    branch there)."""
    log = tmp_path / "runs" / "b64" / "sn_s1" / "log.jsonl"
    log.write_text(log.read_text() + json.dumps({"iteration": 10**15, "event": "collapse", "layers": []}) + "\n")
    assert command_line(collapse_study.main, [str(study), "--root", str(tmp_path / "runs"), "--out",
                                              str(tmp_path / "report")]) == 2
    assert "a collapse at iteration 1000000000000000, which the run has not reached" in capsys.readouterr().err
