"""figures.spectra on run folders written with save_spectra."""

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from figures import spectra as fig
from source.spectral.spectra import LayerSpectrum, save_spectra

CONVS = ["block1.c1", "block1.c2", "block1.c_sc"]


def synthetic_spectra(iteration: int) -> dict[str, LayerSpectrum]:
    """Spectra whose lower values shrink with the iteration, plus a 1-value linear layer like D's l7."""
    decay = iteration / 10_000
    spectra = {
        name: LayerSpectrum("conv", np.linspace(2.0, 2.0 * (1 - decay) / (i + 1), 16 * (i + 1)), 2.0)
        for i, name in enumerate(CONVS)
    }
    spectra["l7"] = LayerSpectrum("linear", np.array([1.5]), 1.5)
    return spectra


def make_run(root, name, iterations, sr_start=None, resumed=None, shift=0):
    """A run folder with spectra at ``iterations`` (those of ``iteration + shift``: a branch's differ from its
    parent's) and, with ``resumed=(snapshot, iteration)``, the event train.py logs for a resume."""
    run = root / name
    for iteration in iterations:
        save_spectra(run, iteration, {"l1": LayerSpectrum("linear", np.array([1.0, 0.5]), 1.0)},
                     synthetic_spectra(iteration + shift))
    lines = [json.dumps({"iteration": 0, "event": "start"})]
    if resumed is not None:
        snapshot, at = resumed
        lines.append(json.dumps({"iteration": at, "event": "resumed", "snapshot": str(snapshot), "changes": []}))
    if sr_start is not None:
        lines.append(json.dumps({"iteration": sr_start, "event": "sr_start", "mode": "dynamic"}))
    (run / "log.jsonl").write_text("\n".join(lines) + "\n" + '{"iteration": 99')  # last line half written
    return run


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_one_run_writes_both_pngs_and_marks_sr(tmp_path):
    run = make_run(tmp_path, "sn", [1000, 2000, 3000, 4000], sr_start=3000)
    written = fig.main([str(run), "--layer", "1", "--iterations", "1000", "3000", "4000", "--pdf"])
    assert sorted(p.name for p in written) == [
        "collapse_heatmap.pdf", "collapse_heatmap.png", "spectra_layer1.pdf", "spectra_layer1.png"
    ]
    assert all(p.parent == run / "figures" and p.stat().st_size > 0 for p in written)

    runs = [fig.read_run(run)]
    assert runs[0].sr_start == 3000
    figure = fig.spectra_figure(runs, "dis", "block1.c2", 1, [1000, 3000, 4000])
    (ax,) = figure.axes
    assert len(ax.lines) == 3
    assert [line.get_label() for line in ax.lines] == ["1000", "3000 (SR start)", "4000 (SR)"]
    assert [line.get_linestyle() for line in ax.lines] == ["-", "-", "--"]
    assert ax.lines[1].get_linewidth() > ax.lines[0].get_linewidth()
    np.testing.assert_allclose(ax.lines[0].get_ydata(), synthetic_spectra(1000)["block1.c2"].normalized)


def test_heatmap_has_one_row_per_conv_and_sr_line(tmp_path):
    run = make_run(tmp_path, "sn", [1000, 2000, 5000], sr_start=2000)
    figure = fig.collapse_heatmap_figure([fig.read_run(run)], "dis")
    ax = figure.axes[0]
    mesh = ax.collections[0]
    rows, columns = mesh.get_coordinates().shape[:2]  # the cell edges; matplotlib < 3.8 keeps the values flattened
    scores = mesh.get_array().reshape(rows - 1, columns - 1)
    assert scores.shape == (len(CONVS), 3)
    expected = np.mean(synthetic_spectra(5000)["block1.c_sc"].normalized[1:])
    assert scores[2, 2] == pytest.approx(expected)
    assert [line.get_xdata()[0] for line in ax.lines] == [2000]


def test_two_runs_side_by_side_share_y(tmp_path):
    sn = make_run(tmp_path, "sn", [1000, 2000, 3000, 4000])
    sr = make_run(tmp_path, "sr", [2000, 3000, 4000, 5000], sr_start=2000)
    out = tmp_path / "out"
    written = fig.main([str(sn), str(sr), "--iterations", "1000", "2000", "5000", "--out", str(out)])
    assert sorted(p.name for p in written) == ["collapse_heatmap_sn_vs_sr.png", "spectra_layer2_sn_vs_sr.png"]
    assert all(p.parent == out and p.stat().st_size > 0 for p in written)

    runs = [fig.read_run(sn), fig.read_run(sr)]
    figure = fig.spectra_figure(runs, "dis", "block1.c_sc", 2, [1000, 2000, 5000])
    left, right = figure.axes
    assert (len(left.lines), len(right.lines)) == (2, 2)  # each panel shows the iterations it has
    assert left.get_shared_y_axes().joined(left, right)
    # the same iteration has the same colour in both panels
    assert left.lines[1].get_color() == pytest.approx(right.lines[0].get_color())
    assert len(fig.collapse_heatmap_figure(runs, "dis").axes) == 4  # 2 panels + 2 colour bars


def test_a_branch_is_drawn_with_its_parents_spectra_up_to_where_it_branched(tmp_path, monkeypatch):
    """The SRGANs protocol: SR switched on at the SN run's snapshot 2000, in a new folder beside it."""
    make_run(tmp_path / "results", "sn", [1000, 2000, 3000, 4000])
    monkeypatch.chdir(tmp_path)  # train.py logs the snapshot as given: relative to where it ran
    sr = make_run(tmp_path / "results", "sn-resume2000", [3000, 4000], sr_start=2001,
                  resumed=("results/sn/snapshots/snapshot_iter_2000.pt", 2000), shift=500)
    monkeypatch.chdir(sr)  # drawn from elsewhere: found from the folder above the branch
    run = fig.read_run(sr)
    assert sorted(run.records) == [1000, 2000, 3000, 4000] and run.inherited == [("sn", 2000)]
    assert run.sr_start == 2001
    spectrum = {i: run.records[i].nets["dis"]["block1.c2"].normalized for i in run.records}
    np.testing.assert_allclose(spectrum[2000], synthetic_spectra(2000)["block1.c2"].normalized)  # the parent's
    np.testing.assert_allclose(spectrum[3000], synthetic_spectra(3500)["block1.c2"].normalized)  # its own

    (ax,) = fig.spectra_figure([run], "dis", "block1.c2", 1, [1000, 2000, 3000]).axes
    assert [line.get_linestyle() for line in ax.lines] == ["-", "-", "--"]  # SN's curves, then SR's
    assert ax.get_title().endswith("\nto 2000 from sn")
    heatmap = fig.collapse_heatmap_figure([run], "dis").axes[0]
    assert heatmap.collections[0].get_array().size == len(CONVS) * 4  # the whole history: 4 columns
    assert [(line.get_xdata()[0], line.get_label()) for line in heatmap.lines] == [
        (2000, "branched from sn (2000)"), (2001, "SR start (2001)")]


def test_train_py_branch_drawn_through_the_command_line(tmp_path, monkeypatch):
    """The README's steps 1, 4 and 6 at toy size: SN, its snapshot 2 resumed with SR (a branch), the branch drawn."""
    import train
    from test_training import tiny_argv

    monkeypatch.chdir(tmp_path)
    assert train.main(tiny_argv(Path("sn"), 6, "updater.apply_SR=false", "spectra_interval=1")) == 0
    assert train.main(["--resume", "sn/snapshots/snapshot_iter_3.pt", "--set", "updater.apply_SR=true",
                       "--set", "updater.sr.mode=static"]) == 0  # static: edits from its first call
    branch = tmp_path / "sn-resume3"
    run = fig.read_run(branch)
    assert sorted(run.records) == [1, 2, 3, 4, 5, 6] and run.inherited == [("sn", 3)] and run.sr_start is not None
    layer = run.records[1].conv_index["dis"][-1]
    sn = fig.read_run(tmp_path / "sn")
    for iteration, same in ((1, True), (3, True), (6, False)):  # the SN run's to the branch point, then SR's own
        assert np.array_equal(run.records[iteration].nets["dis"][layer].singular_values,
                              sn.records[iteration].nets["dis"][layer].singular_values) == same
    written = fig.main([str(branch)])
    assert [p.name for p in written][1] == "collapse_heatmap.png" and all(p.parent == branch / "figures" for p in written)


def test_a_branch_of_a_branch_and_logs_that_loop(tmp_path):
    a = make_run(tmp_path, "a", [1000, 2000, 3000], sr_start=1500)
    b = make_run(tmp_path, "b", [2000, 3000], resumed=(a / "snapshots/snapshot_iter_2000.pt", 2000), shift=100)
    c = make_run(tmp_path, "c", [4000], resumed=(b / "snapshots/snapshot_iter_3000.pt", 3000), shift=200)
    run = fig.read_run(c)
    assert run.inherited == [("b", 3000), ("a", 2000)] and sorted(run.records) == [1000, 2000, 3000, 4000]
    assert run.sr_start == 1500  # a's SR started before b took over
    np.testing.assert_allclose(run.records[3000].nets["dis"]["block1.c1"].normalized,
                               synthetic_spectra(3100)["block1.c1"].normalized)  # b's 3000, not a's
    assert fig.lineage_note(run) == "\nto 2000 from a; to 3000 from b"
    # trained elsewhere (an absolute path of another machine), the folders brought here side by side
    moved = make_run(tmp_path, "moved", [5000], resumed=("/gpu/work/results/x/a/snapshots/snapshot_iter_3000.pt", 3000))
    assert fig.read_run(moved).inherited == [("a", 3000)]
    # a log naming a descendant's snapshot (copied folders, edited logs) ends the walk instead of looping
    make_run(tmp_path, "a", [], resumed=(c / "snapshots/snapshot_iter_4000.pt", 4000))
    assert [name for name, _ in fig.read_run(c).inherited] == ["b", "a"]
    # paths no run has: a NUL, ten thousand folders deep (read from a log made elsewhere)
    for odd in ("a\x00b/snapshots/snapshot_iter_3000.pt", "x/" * 10_000 + "a/snapshots/snapshot_iter_3000.pt"):
        weird = make_run(tmp_path, "weird", [5000], resumed=(odd, 3000))
        assert fig.read_run(weird).inherited[:1] == ([("a", 3000)] if odd.startswith("x/") else [])
    # a parent no longer there: the branch alone, as before
    sr = make_run(tmp_path, "lone", [5000], resumed=(tmp_path / "gone/snapshots/snapshot_iter_10.pt", 10))
    assert fig.read_run(sr).inherited == [] and sorted(fig.read_run(sr).records) == [5000]


def test_default_iterations_are_capped_and_gen_net_named(tmp_path):
    run = make_run(tmp_path, "long", range(1000, 16_000, 1000))
    chosen = fig.choose_iterations([fig.read_run(run)], None)
    assert len(chosen) == fig.DEFAULT_MAX_CURVES and chosen[0] == 1000 and chosen[-1] == 15_000
    written = fig.main([str(run), "--net", "gen", "--layer", "l1"])
    assert sorted(p.name for p in written)[1] == "spectra_gen_l1.png"


def test_clear_errors(tmp_path):
    run = make_run(tmp_path, "sn", [1000, 2000])
    with pytest.raises(ValueError, match=r"\[3000\]; available: \[1000, 2000\]"):
        fig.main([str(run), "--iterations", "1000", "3000"])
    with pytest.raises(ValueError, match="conv indices 0..2"):
        fig.main([str(run), "--layer", "7"])
    with pytest.raises(ValueError, match="'block9.c1' is not in"):
        fig.main([str(run), "--layer", "block9.c1"])
    with pytest.raises(FileNotFoundError, match="run folder .*empty does not exist"):
        fig.main([str(tmp_path / "empty")])
    with pytest.raises(FileNotFoundError, match="log.jsonl is a file; give the run's folder"):  # a file of the run
        fig.main([str(run / "log.jsonl")])
    (run / "log.jsonl").write_text('{"broken\n{"iteration": 1, "event": "sr_start"}\n')
    with pytest.raises(ValueError, match="log.jsonl:1 is not valid JSON"):
        fig.main([str(run)])
