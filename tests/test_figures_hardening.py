"""The figure command lines and `evaluation.py grids` against a hostile user (issue 8, item 11):
one-line errors, no silent overwrites, labelled padded grids, no blank heatmap rows."""
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

import evaluation
import train
from figures import curves
from figures import spectra as fig
from figures.common import command_line
from figures.grids import PADDING, PADDING_VALUE
from source.spectral.spectra import LayerSpectrum, save_spectra
from test_figures_spectra import make_run, synthetic_spectra
from test_training import tiny_argv

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def one_line_error(stderr: str) -> str:
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    return stderr


def test_figure_command_lines_report_user_errors_in_one_line_with_status_2(tmp_path):
    run = make_run(tmp_path, "sn", [1000, 2000])
    missing = tmp_path / "missing"
    cases = [  # (module, arguments, part of the message): one per module, all at once, as each start costs seconds
        ("spectra", [run, "--layer", "7"], "conv indices 0..2"),
        ("curves", [missing], "run folder"),
        ("collapse", [missing], "run folder"),
    ]
    processes = [subprocess.Popen([sys.executable, "-m", f"figures.{module}", *map(str, args)], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for module, args, _ in cases]
    for (module, _, expected), process in zip(cases, processes):
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 2, (module, stderr)
        assert expected in one_line_error(stderr), (module, stderr)
    assert not missing.exists(), "no RUN/figures folder may be created for a missing run"
    assert not (run / "figures").exists()


def test_runs_without_data_are_one_line_errors(tmp_path, capsys):
    from figures import collapse  # imports the data sets: only here

    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = make_run(tmp_path, "corrupt", [1000])
    next((corrupt / "spectra").iterdir()).write_bytes(b"not an npz")
    cases = [(fig.main, [tmp_path / "missing"], "run folder"), (fig.main, [empty], "holds no spectra_iter"), (fig.main, [corrupt], "is not a readable spectra file"),
             (curves.main, [empty], "metrics.jsonl does not exist (no evaluation yet)"), (collapse.main, [empty], "nothing to plot")]
    for main, args, expected in cases:
        assert command_line(main, [str(a) for a in args]) == 2
        assert expected in one_line_error(capsys.readouterr().err)


def test_records_that_are_not_as_written_here_are_one_line_errors(tmp_path, capsys):
    """A run folder from elsewhere: scores that are no numbers, a protocol without N (each was a TypeError or a
    KeyError traceback)."""
    from figures import collapse

    run = tmp_path / "run"
    run.mkdir()
    cases = (({"FID": {"a": 1}, "protocol": {"n_samples": 10, "reference": "r"}}, "its FID is not a number"),
             ({"FID": 3.0, "protocol": {"reference": "r"}}, "its protocol is not as evaluation writes it"))
    for record, message in cases:
        (run / "metrics.jsonl").write_text(json.dumps({"iteration": 2, **record}) + "\n")
        assert command_line(curves.main, [str(run)]) == 2
        err = one_line_error(capsys.readouterr().err)
        assert f"metrics.jsonl: the record of iteration 2: {message}" in err
    (run / "log.jsonl").write_text(json.dumps({"iteration": 4, collapse.SCORE: {"a": 1}}) + "\n")
    assert command_line(collapse.main, [str(run)]) == 2
    assert f"log.jsonl: the record of iteration 4: its {collapse.SCORE} is not a number" in capsys.readouterr().err
    assert not collapse.cached_measure({"iteration": 4, "per_class": {}, "class_counts": []})  # measured again


def test_two_run_comparison_keeps_the_one_run_figures(tmp_path, capsys):
    sn = make_run(tmp_path, "sn", [1000, 2000, 3000])
    sr = make_run(tmp_path, "sr", [2000, 3000], sr_start=2000)
    one_run = fig.main([str(sn), "--layer", "2"])
    kept = {path: path.read_bytes() for path in one_run}
    compared = fig.main([str(sn), str(sr), "--layer", "2"])
    assert sorted(p.name for p in compared) == ["collapse_heatmap_sn_vs_sr.png", "spectra_layer2_sn_vs_sr.png"]
    assert sorted(p.name for p in (sn / "figures").iterdir()) == sorted(p.name for p in one_run + compared)
    assert all(path.read_bytes() == content for path, content in kept.items()), "fig3 was overwritten"
    assert capsys.readouterr().out.split() == [str(p) for p in one_run + compared]


def test_layer_help_needs_no_outside_document(capsys):
    with pytest.raises(SystemExit):
        fig.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ".md" not in text and "sorted by module name, from 0" in text


def test_heatmap_leaves_out_layers_with_one_singular_value_and_says_so(tmp_path):
    run = tmp_path / "run"
    for iteration in (1000, 2000):  # block0.c_sc: a 1x1 conv to one channel, so conv index 0 has no score
        spectra = {**synthetic_spectra(iteration), "block0.c_sc": LayerSpectrum("conv", np.array([0.7]), 0.7)}
        save_spectra(run, iteration, {}, spectra)
    figure = fig.collapse_heatmap_figure([fig.read_run(run)], "dis")
    ax = figure.axes[0]
    assert [label.get_text() for label in ax.get_yticklabels()] == ["1 block1.c1", "2 block1.c2", "3 block1.c_sc"]
    mesh = ax.collections[0]
    rows, columns = mesh.get_coordinates().shape[:2]  # the cell edges; matplotlib < 3.8 keeps the values flattened
    scores = mesh.get_array().reshape(rows - 1, columns - 1)
    assert scores.shape == (3, 2) and not np.ma.getmaskarray(scores).all(axis=1).any(), "no blank row"
    (note,) = figure.texts
    assert "one singular value" in note.get_text() and "0 block0.c_sc, l7" in note.get_text()


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> str:
    run = tmp_path_factory.mktemp("grids") / "run"
    assert train.main(tiny_argv(run, 1, "evaluation.metrics=[]")) == 0
    return str(run / "snapshots" / "snapshot_iter_1.pt")


def grid_argv(snapshot: str, out: Path, *extra: str) -> list[str]:
    return ["grids", "--snapshot", snapshot, "--rows", "2", "--columns", "5", "--out", str(out), *extra]


def test_grids_are_padded_and_titled_with_the_class(snapshot, tmp_path):
    assert evaluation.main(grid_argv(snapshot, tmp_path, "--classes", "0", "2")) == 0
    with Image.open(tmp_path / "class_0.png") as first, Image.open(tmp_path / "class_2.png") as second:
        pixels, other = np.asarray(first), np.asarray(second)
    step = 32 + PADDING
    assert pixels.shape[1] == 5 * step - PADDING and pixels.shape == other.shape
    strip = pixels.shape[0] - (2 * step - PADDING)
    assert strip > 10, "a title strip above the samples"
    grid = pixels[strip:]
    gaps = [offset + i for offset in range(32, 5 * step - PADDING, step) for i in range(PADDING)]
    assert (grid[:, gaps] == PADDING_VALUE).all() and (grid[32:32 + PADDING] == PADDING_VALUE).all()
    assert (grid[:, :32] != PADDING_VALUE).any(), "samples, not padding, in the first column"
    title, other_title = pixels[:strip], other[:strip]
    assert (title < 128).any(), "the title is drawn"
    assert not np.array_equal(title, other_title), "each grid names its class"


def test_grids_refuse_to_overwrite_unless_forced(snapshot, tmp_path, capsys):
    assert evaluation.main(grid_argv(snapshot, tmp_path, "--classes", "0")) == 0
    first = (tmp_path / "class_0.png").read_bytes()
    capsys.readouterr()
    assert evaluation.main(grid_argv(snapshot, tmp_path, "--classes", "1", "0", "--seed", "3")) == 2
    assert "class_0.png already exists; pass --force" in one_line_error(capsys.readouterr().err)
    assert (tmp_path / "class_0.png").read_bytes() == first
    assert not (tmp_path / "class_1.png").exists(), "refused before drawing anything"
    assert evaluation.main(grid_argv(snapshot, tmp_path, "--classes", "1", "0", "--seed", "3", "--force")) == 0
    assert (tmp_path / "class_0.png").read_bytes() != first and (tmp_path / "class_1.png").exists()


def test_a_grids_folder_planted_as_a_link_is_not_written_through(snapshot, tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(Path(snapshot).parents[1], run, ignore=shutil.ignore_patterns(".lock"))
    victim = tmp_path / "victim"
    victim.mkdir()
    (run / "figures").mkdir(exist_ok=True)
    (run / "figures" / "grids_iter_1").symlink_to(victim, target_is_directory=True)
    argv = ["grids", "--snapshot", str(run / "snapshots" / "snapshot_iter_1.pt"), "--rows", "1", "--columns", "2"]
    assert evaluation.main(argv + ["--classes", "0"]) == 2
    assert "grids_iter_1 is a symbolic link" in one_line_error(capsys.readouterr().err)
    assert not any(victim.iterdir())


def test_links_planted_in_a_run_folder_are_not_written_through(tmp_path, capsys):
    """A run folder from elsewhere may hold symbolic links: its figures folder pointing into the user's files, or
    a figure's name pointing at one. Nothing is written through either; each is a one-line error."""
    victim = tmp_path / "home"
    victim.mkdir()
    precious = victim / "notes.txt"
    precious.write_text("keep me")
    folder_link = make_run(tmp_path, "folder_link", [1000, 2000])
    (folder_link / "figures").symlink_to(victim, target_is_directory=True)
    file_link = make_run(tmp_path, "file_link", [1000, 2000])
    (file_link / "figures").mkdir()
    (file_link / "figures" / "spectra_layer2.png").symlink_to(precious)
    for run, expected in ((folder_link, "figures is a symbolic link"), (file_link, "spectra_layer2.png is a symbolic link")):
        assert command_line(fig.main, [str(run), "--layer", "2"]) == 2
        assert expected in one_line_error(capsys.readouterr().err)
    assert sorted(path.name for path in victim.iterdir()) == ["notes.txt"] and precious.read_text() == "keep me"
    assert command_line(fig.main, [str(file_link), "--layer", "2", "--out", str(tmp_path / "mine")]) == 0  # --out: the user's
