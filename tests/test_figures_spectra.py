"""figures.spectra on run folders written with save_spectra."""

import json

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


def make_run(root, name, iterations, sr_start=None):
    run = root / name
    for iteration in iterations:
        save_spectra(run, iteration, {"l1": LayerSpectrum("linear", np.array([1.0, 0.5]), 1.0)},
                     synthetic_spectra(iteration))
    lines = [json.dumps({"iteration": 0, "event": "start"})]
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
