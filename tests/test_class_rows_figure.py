"""figures.class_rows on snapshots written by train.main: one row per class, the same latents in every panel."""
import numpy as np
import pytest
from PIL import Image

import train
from figures import class_rows
from figures.common import command_line
from figures.grids import PADDING
from test_training import tiny_argv

BIGGAN = ["models.generator={name: BigGANGenerator, args: {dim_z: 16, shared_dim: 8, ch: 2, n_classes: 3, "
          "resolution: 32, channels: 3, attention_after: 2}}",
          "models.discriminator={name: BigGANDiscriminator, args: {ch: 4, n_classes: 3, resolution: 32, "
          "channels: 3, attention_after: 1}}", "evaluation.metrics=[]"]


def test_two_panels_of_class_rows(tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(tiny_argv(run, 2, *BIGGAN)) == 0
    snapshot = run / "snapshots" / "snapshot_iter_2.pt"
    out = tmp_path / "rows.png"
    assert command_line(class_rows.main, [str(snapshot), str(snapshot), "--out", str(out), "--columns", "4",
                                          "--titles", "left", "right"]) == 0
    image = np.asarray(Image.open(out).convert("L"))
    panel = (image.shape[1] - class_rows.GAP) // 2
    assert panel == 4 * (64 + PADDING) - PADDING  # 4 columns of 32 px samples at scale 2
    left, right = image[:, :panel], image[:, panel + class_rows.GAP:]
    rows_height = 3 * (64 + PADDING) - PADDING
    assert np.array_equal(left[-rows_height:], right[-rows_height:]), "same snapshot, same latents: same samples"
    first_row, second_row = left[-rows_height:][:64], left[-rows_height:][64 + PADDING:2 * 64 + PADDING]
    assert not np.array_equal(first_row, second_row), "rows are different classes"


def test_an_unconditional_generator_is_a_one_line_error(tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(tiny_argv(run, 2, "models.generator.args.n_classes=0", "models.discriminator.args.n_classes=0",
                                "evaluation.metrics=[]")) == 0
    status = command_line(class_rows.main, [str(run / "snapshots" / "snapshot_iter_2.pt"),
                                            "--out", str(tmp_path / "x.png")])
    assert status == 2 and "unconditional" in capsys.readouterr().err


def test_sizes_and_seeds_out_of_range_are_usage_errors(capsys):
    """--columns 10^20 tried to allocate petabytes and --seed 10^20 was torch's overflow, after the snapshot was read."""
    for option, value, message in (("--columns", "0", "must be in [1, 100], got 0"),
                                   ("--columns", str(10**20), "must be in [1, 100]"),
                                   ("--scale", "33", "must be in [1, 32], got 33"),
                                   ("--seed", str(10**20), "must be in [0, 2^32)")):
        with pytest.raises(SystemExit) as exit_:
            command_line(class_rows.main, ["never-read.pt", "--out", "never-written.png", option, value])
        assert exit_.value.code == 2
        assert f"argument {option}: {message}" in capsys.readouterr().err
