"""figures.curves: IS/FID/KID vs iteration from run folders, resume points and SR starts."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from figures import curves

PROTOCOL = {"n_samples": 250, "splits": 1, "reference": "ref.npz",
            "reference_key": {"dataset": "fashion_mnist", "split": "train", "n_images": 1000}}


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def metric_record(iteration: int, fid: float, kid: float | None = None, protocol: dict = PROTOCOL) -> dict:
    record = {"iteration": iteration, "FID": fid, "protocol": protocol}
    if kid is not None:
        record.update(KID=kid, KID_std=kid / 10)
    return record


@pytest.fixture
def sn_and_sr_runs(tmp_path):
    """An SN run to 70 and an SR run branched from its snapshot at 40 (new folder, as train.py does)."""
    sn, sr = tmp_path / "sn", tmp_path / "sn-resume40"
    write_jsonl(sn / "metrics.jsonl", [metric_record(i, 100.0 - i, kid=0.1) for i in (10, 20, 30, 40, 50, 60, 70)])
    write_jsonl(sn / "log.jsonl", [{"iteration": 1, "loss_dis": 1.0}])
    write_jsonl(sr / "metrics.jsonl", [metric_record(i, 50.0 - i / 10, kid=0.05) for i in (50, 60, 70)])
    snapshot = str(sn / "snapshots" / "snapshot_iter_40.pt")
    write_jsonl(sr / "log.jsonl", [{"iteration": 40, "event": "resumed", "snapshot": snapshot, "changes": []},
                                   {"iteration": 40, "event": "sr_start", "mode": "dynamic"},
                                   {"iteration": 41, "loss_dis": 1.0}])
    return sn, sr


def run_lines(ax, label: str):
    return [line for line in ax.get_lines() if line.get_label() == label]


def test_one_panel_per_metric_and_one_line_per_run(sn_and_sr_runs):
    sn, sr = sn_and_sr_runs
    figure = curves.curves_figure([curves.read_run(sn, "SNGAN"), curves.read_run(sr, "SRGAN")])
    assert [ax.get_ylabel() for ax in figure.axes] == ["FID", "KID"]
    for ax in figure.axes:
        assert len(run_lines(ax, "SNGAN")) == 1 and len(run_lines(ax, "SRGAN")) == 1
    fid = figure.axes[0]
    np.testing.assert_array_equal(run_lines(fid, "SNGAN")[0].get_xdata(), [10, 20, 30, 40, 50, 60, 70])
    assert "N=250" in fid.get_title() and "fashion_mnist train 1000 imgs" in fid.get_title()


def test_resumed_run_starts_at_the_parents_value_and_marks_resume_and_sr_start(sn_and_sr_runs):
    sn, sr = sn_and_sr_runs
    run = curves.read_run(sr, "SRGAN")
    assert run.sr_start == 40 and run.resumes[40]["FID"] == 60.0
    fid = curves.curves_figure([curves.read_run(sn, "SNGAN"), run]).axes[0]
    line = run_lines(fid, "SRGAN")[0]
    np.testing.assert_array_equal(line.get_xdata(), [40, 50, 60, 70])
    assert line.get_ydata()[0] == 60.0  # the SN run's FID at the resume point
    markers = [l for l in fid.get_lines() if l.get_marker() == "D"]
    assert len(markers) == 1 and list(markers[0].get_xdata()) == [40]
    event_lines = [l for l in fid.get_lines() if l.get_label().startswith("SRGAN: ")]
    assert [l.get_label() for l in event_lines] == ["SRGAN: resumed (40), SR start (40)"]
    assert event_lines[0].get_linestyle() == "--"


def test_a_snapshot_path_relative_to_where_training_ran_finds_its_parent_from_elsewhere(tmp_path, monkeypatch):
    sn, sr = tmp_path / "results" / "sn", tmp_path / "results" / "sn-resume40"
    write_jsonl(sn / "metrics.jsonl", [metric_record(i, 100.0 - i) for i in (20, 40)])
    write_jsonl(sn / "log.jsonl", [{"iteration": 0, "event": "start"}])  # every run's folder has its log
    write_jsonl(sr / "metrics.jsonl", [metric_record(50, 45.0)])
    write_jsonl(sr / "log.jsonl", [{"iteration": 40, "event": "resumed", "snapshot": "results/sn/snapshots/"
                                    "snapshot_iter_40.pt", "changes": []}])  # as train.py got it, run from tmp_path
    monkeypatch.chdir(sn)  # somewhere the relative path does not lead
    assert curves.read_run(sr, "SR").resumes[40]["FID"] == 60.0


def test_main_writes_a_non_empty_png_and_pdf(sn_and_sr_runs, tmp_path):
    sn, sr = sn_and_sr_runs
    written = curves.main([str(sn), str(sr), "--labels", "SNGAN", "SRGAN", "--pdf"])
    assert written == [sn / "figures" / "curves.png", sn / "figures" / "curves.pdf"]
    with Image.open(written[0]) as image:
        assert image.width > 500 and image.height > 300
        assert len(np.unique(np.asarray(image.convert("L")))) > 10, "the PNG must show something"
    assert written[1].stat().st_size > 1000


def test_is_panel_with_std_band_and_protocol_mismatch_flag(tmp_path):
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    write_jsonl(run_a / "metrics.jsonl", [{"iteration": i, "IS": 2.0 + i, "IS_std": 0.5, "protocol": PROTOCOL}
                                          for i in (1, 2, 3)])
    other = {**PROTOCOL, "splits": 10}
    write_jsonl(run_b / "metrics.jsonl", [{"iteration": i, "IS": 1.0 + i, "IS_std": 0.0, "protocol": other}
                                          for i in (1, 2)])
    figure = curves.curves_figure([curves.read_run(run_a, "a"), curves.read_run(run_b, "b")])
    (ax,) = figure.axes
    assert ax.get_ylabel() == "IS" and "not comparable" in ax.get_title()
    assert len(ax.collections) == 1, "only the run with a nonzero std gets a band"


def test_an_ema_run_beside_a_raw_run_is_flagged_and_a_lone_ema_run_says_so(tmp_path):
    raw, ema = tmp_path / "raw", tmp_path / "ema"
    write_jsonl(raw / "metrics.jsonl", [metric_record(i, 50.0 - i) for i in (1, 2)])
    write_jsonl(ema / "metrics.jsonl", [metric_record(i, 40.0 - i, protocol={**PROTOCOL, "generator": "ema"})
                                        for i in (1, 2)])
    runs = [curves.read_run(raw, "raw"), curves.read_run(ema, "ema")]
    assert curves.protocol_label(runs, "FID") == "different protocols: not comparable"
    assert curves.protocol_label(runs[1:], "FID").endswith("G's EMA weights")


def test_half_written_last_line_is_skipped_and_missing_metrics_is_a_clear_error(tmp_path):
    run = tmp_path / "run"
    write_jsonl(run / "metrics.jsonl", [metric_record(5, 10.0)])
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"iteration": 10, "FI')
    assert list(curves.read_run(run, "run").records) == [5]
    empty = tmp_path / "empty"
    write_jsonl(empty / "log.jsonl", [{"iteration": 1, "loss_dis": 1.0}])
    with pytest.raises(ValueError, match=r"metrics.jsonl does not exist \(no evaluation yet\)"):
        curves.main([str(empty)])
    write_jsonl(empty / "metrics.jsonl", [{"iteration": 1, "classifier_modes": 3}])
    with pytest.raises(ValueError, match="metrics.jsonl holds no IS/FID/KID records"):
        curves.main([str(empty)])
    with pytest.raises(SystemExit):
        curves.main([str(run), "--labels", "a", "b"])


def test_a_run_without_records_yet_is_left_out_with_a_note(tmp_path, capsys):
    """A branch just started (no evaluation yet) made the whole figure fail."""
    run, fresh = tmp_path / "run", tmp_path / "fresh"
    write_jsonl(run / "metrics.jsonl", [metric_record(5, 10.0), metric_record(10, 8.0)])
    write_jsonl(fresh / "log.jsonl", [{"iteration": 1, "loss_dis": 1.0}])
    written = curves.main([str(run), str(fresh), "--out", str(tmp_path / "figures")])
    assert [path.name for path in written] == ["curves.png"]
    note = capsys.readouterr().err
    assert "fresh/metrics.jsonl does not exist (no evaluation yet)" in note and note.endswith("; left out of the figure\n")
