"""figures.class_spectra on hand-made RUN/class_spectra.jsonl files (the format the training code writes)."""
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from figures import class_spectra as fig
from figures.common import command_line

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["block2.b1", "block2.b2", "block3.b1"]
LT_COUNTS = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]  # CIFAR-10-LT, imbalance 100


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def record(iteration: int, counts: list[int], growth: float = 1.0) -> dict:
    """sigma of layer l, class y: (l + 1) * (1 + y) * growth * iteration / 1000 for the gain, half that for the bias,
    so the max over layers is the last layer, the mean is twice the first, and rarer classes grow faster."""
    k = len(counts)
    gamma = [[(layer + 1) * (1 + y) * growth * iteration / 1000 for y in range(k)] for layer in range(len(LAYERS))]
    beta = [[value / 2 for value in row] for row in gamma]
    return {"iteration": iteration, "class_counts": counts, "layers": LAYERS, "gamma": gamma, "beta": beta}


def write_run(root: Path, name: str, iterations=(1000, 2000, 3000), counts=LT_COUNTS, growth=1.0,
              tail: str = "") -> Path:
    run = root / name
    run.mkdir(parents=True)
    lines = "".join(json.dumps(record(i, counts, growth)) + "\n" for i in iterations)
    (run / fig.FILE).write_text(lines + tail)
    return run


def one_line_error(stderr: str) -> str:
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    return stderr


def test_one_run_png_and_figure_content(tmp_path, capsys):
    run = write_run(tmp_path, "gsr")
    written, (summary,) = fig.main([str(run)])
    assert written == [run / "figures" / "class_spectra.png"]
    out = capsys.readouterr().out.splitlines()
    assert out[0] == str(written[0]) and out[1].startswith("gsr: iteration 3000") and len(out) == 2

    assert written[0].stat().st_size > 20_000
    with Image.open(written[0]) as image:
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels.shape[0] > 800 and pixels.std() > 10, "not a blank image"
    assert (pixels < 128).mean() > 0.005, "lines and text are drawn"

    figure = fig.class_spectra_figure([fig.read_run(run, "gsr")], list(range(10)), None, "max")
    gain, bias = figure.axes
    assert len(gain.lines) == len(bias.lines) == 10, "every class of 10 by default"
    np.testing.assert_array_equal(gain.lines[0].get_xdata(), [1000, 2000, 3000])
    np.testing.assert_allclose(gain.lines[9].get_ydata(), [30, 60, 90])  # class 9, max = layer 3: 3 * 10 * it / 1000
    np.testing.assert_allclose(bias.lines[9].get_ydata(), [15, 30, 45])
    assert [t.get_text() for t in gain.get_legend().get_texts()][:2] == ["0 (5000)", "1 (2997)"]
    head, tail = gain.lines[0].get_color(), gain.lines[9].get_color()
    assert head[2] > head[0] and tail[0] > tail[2], "head cool (blue), tail warm (red)"
    assert "gsr" in figure._suptitle.get_text() and "max over 3 layers" in figure._suptitle.get_text()


def test_a_branch_continues_its_parents_records_up_to_where_it_branched(tmp_path):
    base = write_run(tmp_path, "base", iterations=(1000, 2000, 3000))
    (base / "log.jsonl").write_text(json.dumps({"iteration": 0, "event": "start"}) + "\n")
    gsr = write_run(tmp_path, "base-resume2000", iterations=(3000, 4000), growth=0.5)
    (gsr / "log.jsonl").write_text(json.dumps({"iteration": 2000, "event": "resumed", "changes": ["updater.gsr"],
                                               "snapshot": str(base / "snapshots/snapshot_iter_2000.pt")}) + "\n")
    run = fig.read_run(gsr, "gsr")
    np.testing.assert_array_equal(run.iterations, [1000, 2000, 3000, 4000])
    # class 9's max over the layers: the parent's 30 * it / 1000 up to 2000, then the branch's own (growth 0.5)
    np.testing.assert_allclose(fig.per_class(run, "gamma", None, "max")[:, 9], [30, 60, 45, 60])
    (gsr / fig.FILE).write_text(json.dumps({**record(4000, LT_COUNTS[:5]), "class_counts": LT_COUNTS[:5]}) + "\n")
    with pytest.raises(ValueError, match=r"base/class_spectra.jsonl: iteration 1000 has layers .* 10 classes"):
        fig.read_run(gsr, "gsr")  # the mismatched record is named with its own file


def test_two_runs_side_by_side_share_y_and_get_a_pair_name(tmp_path, capsys):
    gsr = write_run(tmp_path, "gsr")
    baseline = write_run(tmp_path, "baseline", iterations=(1000, 2000, 3000, 4000), growth=5.0)
    written, summaries = fig.main([str(gsr), str(baseline), "--layer-reduce", "mean"])
    assert written == [gsr / "figures" / "class_spectra_mean_gsr_vs_baseline.png"] and written[0].stat().st_size > 20_000
    assert [s.run for s in summaries] == ["gsr", "baseline"] and [s.iteration for s in summaries] == [3000, 4000]
    assert "note: the runs end at different iterations (3000, 4000)" in capsys.readouterr().out
    fig.main([str(gsr), str(write_run(tmp_path, "other"))])
    assert "note:" not in capsys.readouterr().out  # the same last iteration: nothing to say

    runs = [fig.read_run(gsr, "gsr"), fig.read_run(baseline, "baseline")]
    figure = fig.class_spectra_figure(runs, [0, 9], None, "mean")
    left_gain, right_gain, left_bias, right_bias = figure.axes
    assert left_gain.get_shared_y_axes().joined(left_gain, right_gain)
    assert left_bias.get_shared_y_axes().joined(left_bias, right_bias)
    np.testing.assert_allclose(right_gain.lines[1].get_ydata(), [100, 200, 300, 400])  # mean = 2 * layer 1, x5
    assert left_gain.get_ylim() == right_gain.get_ylim()
    assert left_gain.get_legend() is not None and right_gain.get_legend() is None, "one legend for equal counts"
    assert "gsr vs baseline" in figure._suptitle.get_text()


def test_runs_with_the_same_folder_name_are_told_apart(tmp_path):
    a = write_run(tmp_path / "gsr", "run")
    b = write_run(tmp_path / "baseline", "run")
    written, summaries = fig.main([str(a), str(b), "--out", str(tmp_path / "out")])
    assert [s.run for s in summaries] == ["gsr/run", "baseline/run"]
    assert written == [tmp_path / "out" / "class_spectra_gsr-run_vs_baseline-run.png"]


def test_summary_numbers_for_a_hand_made_file(tmp_path, capsys):
    run = tmp_path / "hand"
    run.mkdir()
    rows = [{"iteration": 500, "class_counts": [100, 10, 50, 1], "layers": ["a", "b"],
             "gamma": [[9, 9, 9, 9], [9, 9, 9, 9]], "beta": [[0, 0, 0, 0], [0, 0, 0, 0]]},
            {"iteration": 1000, "class_counts": [100, 10, 50, 1], "layers": ["a", "b"],
             "gamma": [[1.0, 4.0, 2.0, 8.0], [3.0, 2.0, 1.0, 6.0]], "beta": [[0, 0, 0, 0], [0, 0, 0, 0]]}]
    (run / fig.FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    # head = classes 0 and 2 (100, 50 images), tail = classes 1 and 3 (10, 1)
    _, (summary,) = fig.main([str(run), "--json"])
    line = json.loads(capsys.readouterr().out)
    assert line["iteration"] == 1000 and line["head_classes"] == [0, 2] and line["tail_classes"] == [1, 3]
    assert line["head_sigma_gamma"] == pytest.approx((3 + 2) / 2)  # max over layers: 3, 2
    assert line["tail_sigma_gamma"] == pytest.approx((4 + 8) / 2)  # 4, 8
    assert line["tail_over_head"] == pytest.approx(6 / 2.5) and line["balanced"] is False
    assert line["figure"] == str(run / "figures" / "class_spectra.png")

    _, (summary,) = fig.main([str(run), "--layer-reduce", "mean"])
    assert (summary.head_sigma_gamma, summary.tail_sigma_gamma) == pytest.approx((1.75, 5.0))
    assert "tail/head 2.86" in capsys.readouterr().out
    _, (summary,) = fig.main([str(run), "--layer", "b"])
    assert (summary.head_sigma_gamma, summary.tail_sigma_gamma) == pytest.approx((2.0, 4.0))
    assert summary.reduction == "layer b"
    assert sorted(p.name for p in (run / "figures").iterdir()) == [
        "class_spectra.png", "class_spectra_b.png", "class_spectra_mean.png"]


def test_balanced_data_and_a_zero_head(tmp_path):
    run = tmp_path / "balanced"
    run.mkdir()
    row = {"iteration": 10, "class_counts": [7, 7, 7], "layers": ["a"], "gamma": [[0.0, 0.0, 0.0]], "beta": [[1, 2, 3]]}
    (run / fig.FILE).write_text(json.dumps(row) + "\n")
    summary = fig.summarize(fig.read_run(run, "balanced"), None, "max")
    assert summary.balanced and summary.head_classes == [0] and summary.tail_classes == [2]
    assert summary.to_dict()["tail_over_head"] is None and "balanced data" in summary.line()
    figure = fig.class_spectra_figure([fig.read_run(run, "balanced")], [0, 1, 2], None, "max")
    colors = {line.get_color() for line in figure.axes[0].lines}
    assert len(colors) == 3, "equal counts: classes still get distinct colours"


def test_many_classes_default_to_three_head_and_three_tail(tmp_path):
    counts = [1300 - 10 * y for y in range(100)]
    counts[50], counts[7] = 5000, 1  # the head and tail are by count, not by index
    run = write_run(tmp_path, "many", counts=counts)
    runs = [fig.read_run(run, "many")]
    assert fig.choose_classes(runs, None) == [50, 0, 1, 98, 99, 7]
    assert fig.choose_classes(runs, ["3", "1", "3"]) == [3, 1]
    assert fig.choose_classes(runs, ["all"]) [:2] == [50, 0] and len(fig.choose_classes(runs, ["all"])) == 100
    written, _ = fig.main([str(run), "--classes", "0", "99", "--logy"])
    assert written[0].stat().st_size > 20_000


def test_torn_last_line_is_skipped_with_a_note(tmp_path, capsys):
    run = write_run(tmp_path, "crashed", tail='{"iteration": 4000, "class_counts": [5000, 29')
    _, (summary,) = fig.main([str(run)])
    assert summary.iteration == 3000
    err = capsys.readouterr().err
    assert f"{run / fig.FILE}:4 is cut off" in err and "skipped" in err
    (run / fig.FILE).write_text('{"iteration": 1\n' + json.dumps(record(2000, LT_COUNTS)) + "\n")
    assert command_line(fig.main, [str(run)]) == 2
    assert f"{fig.FILE}:1 is not valid JSON" in one_line_error(capsys.readouterr().err)


def test_missing_empty_and_malformed_files_are_one_line_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert command_line(fig.main, [str(empty)]) == 2
    err = one_line_error(capsys.readouterr().err)
    assert f"{empty / fig.FILE} does not exist" in err and "every spectra_interval iterations" in err
    assert "class-conditional generator" in err
    (empty / fig.FILE).write_text("")
    assert command_line(fig.main, [str(empty)]) == 2
    assert "is empty: per-class spectra are written" in one_line_error(capsys.readouterr().err)
    assert command_line(fig.main, [str(tmp_path / "missing")]) == 2
    assert "run folder" in one_line_error(capsys.readouterr().err)

    bad = record(1000, [3, 2, 1])
    bad["gamma"] = bad["gamma"][:2]
    (empty / fig.FILE).write_text(json.dumps(bad) + "\n" + json.dumps(record(2000, [3, 2, 1])) + "\n")
    assert command_line(fig.main, [str(empty)]) == 2
    assert "class_spectra.jsonl:1: gamma must hold one list of 3 values" in one_line_error(capsys.readouterr().err)
    assert not (empty / "figures").exists() and not (tmp_path / "missing").exists()


def test_classes_and_layer_validation(tmp_path, capsys):
    run = write_run(tmp_path, "gsr")
    cases = [(["--classes", "0", "10"], "--classes: class 10 is out of range; the run has classes 0..9"),
             (["--classes", "-1"], "class -1 is out of range"),
             (["--classes", "head"], "'head' is not a class index"),
             (["--layer", "block9.b1"], "--layer 'block9.b1' is not in"),
             ]
    for extra, expected in cases:
        assert command_line(fig.main, [str(run), *extra]) == 2
        assert expected in one_line_error(capsys.readouterr().err), extra
    assert command_line(fig.main, [str(run), "--layer", "nope"]) == 2
    assert "layers: block2.b1, block2.b2, block3.b1" in capsys.readouterr().err
    few = write_run(tmp_path, "few", counts=[10, 5, 1])
    assert command_line(fig.main, [str(run), str(few), "--classes", "5"]) == 2
    assert "the runs have classes 0..2" in one_line_error(capsys.readouterr().err)
    assert command_line(fig.main, [str(run), str(few)]) == 2
    assert "the runs have 10 and 3 classes; pass --classes" in one_line_error(capsys.readouterr().err)
    assert command_line(fig.main, [str(run), str(tmp_path / "." / "gsr")]) == 2
    assert "the same run folder is given twice" in one_line_error(capsys.readouterr().err)
    assert not (run / "figures").exists(), "no figure for a refused command"
    with pytest.raises(SystemExit):
        fig.parse_args([str(run), "--layer", "a", "--layer-reduce", "mean"])
    with pytest.raises(SystemExit):
        fig.parse_args([str(run), str(run), str(run)])


def test_out_file_or_folder_and_overwrite(tmp_path, capsys):
    run = write_run(tmp_path, "gsr")
    written, _ = fig.main([str(run), "--out", str(tmp_path / "paper" / "fig5.png"), "--pdf"])
    assert written == [tmp_path / "paper" / "fig5.png", tmp_path / "paper" / "fig5.pdf"]
    assert all(p.stat().st_size > 0 for p in written)
    again, _ = fig.main([str(run), "--out", str(tmp_path / "paper")])
    assert again == [tmp_path / "paper" / "class_spectra.png"]
    fig.main([str(run), "--out", str(tmp_path / "paper")])  # overwrites, as figures.spectra and figures.curves do


def test_command_line_module(tmp_path):
    run = write_run(tmp_path, "gsr")
    done = subprocess.run([sys.executable, "-m", "figures.class_spectra", str(run), "--classes", "11"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "out of range" in one_line_error(done.stderr)
