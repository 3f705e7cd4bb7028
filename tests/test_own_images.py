"""The README's "Your own images": its command trains on a folder of class folders that is not ImageNet."""
import logging
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import train
from source.datasets import DatasetError, build_dataset
from source.datasets.imagenet import ImageNetArgs
from source.training.checkpoint import load_snapshot

ROOT = Path(__file__).resolve().parents[1]
TINY = ["models.generator.args.ch=4", "models.discriminator.args.ch=4", "batchsize=4", "micro_batchsize=4",
        "iteration=2", "num_workers=0", "snapshot_interval=2", "evaluation.metrics=[]"]


def readme_command(out: Path, root: Path) -> list[str]:
    """train.py's arguments in the README's own-images command, with this test's folders."""
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"python train\.py --config configs/demo\.yaml --out runs/mine .*?(?=\n```)", readme, re.S)
    argv = shlex.split(command.group(0).replace("\\\n", " "))[2:]
    argv = [str(ROOT / a) if a.startswith("configs/") else a for a in argv]
    argv[argv.index("runs/mine")] = str(out)
    argv[argv.index("dataset.args.root=/data/mine")] = f"dataset.args.root={root}"
    return argv + [a for item in TINY for a in ("--set", item)]


def write_images(folder: Path, count: int, rng: np.random.Generator) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):  # PNG and JPEG, landscape and portrait: each cropped to its centre square
        pixels = rng.integers(0, 255, (40 + 7 * i, 50, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / (f"{i}.png" if i % 2 else f"{i}.jpg"))


def test_the_readme_command_trains_on_three_class_folders(tmp_path, capsys):
    rng = np.random.default_rng(0)
    root = tmp_path / "mine"
    for name in ("owls", "cats", "dogs"):
        write_images(root / name, 3, rng)
    out = tmp_path / "run"
    assert train.main(readme_command(out, root) + ["--dry-run"]) == 0
    assert "data  imagenet: 9 images, 3 classes, 32px; per class: 3 3 3" in capsys.readouterr().out
    assert train.main(readme_command(out, root)) == 0
    printed = capsys.readouterr().out.splitlines()  # the run says what it read, as its dry run did
    assert printed[0] == "reading the training data (imagenet)"
    assert "data: imagenet: 9 images, 3 classes, 32px; per class: 3 3 3 (rho 1.0)" in printed
    snapshot = load_snapshot(out / "snapshots" / "snapshot_iter_2.pt")
    assert snapshot["config"]["dataset"]["args"]["size"] == 32  # the generator's resolution, not ImageNet's 128
    gen, dis = snapshot["gen"], snapshot["dis"]
    assert gen["block2.b1.gamma.weight"].shape[0] == 3 and dis["l_y.parametrizations.weight.original"].shape[0] == 3
    assert dis["block1.c1.parametrizations.weight.original"].shape[1] == 3  # colour images in


def test_images_lying_in_the_root_are_refused_with_where_to_put_them(tmp_path, capsys):
    root = tmp_path / "mine"
    write_images(root, 4, np.random.default_rng(1))
    assert train.main(readme_command(tmp_path / "run", root)) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"error: dataset.args.root: the images lie in {root} itself (0.jpg, 1.png, 2.jpg, 3.png); "
                     "labels come from class folders: move them into one (a single class; unconditional models: "
                     "n_classes 0) or list them in dataset.args.list_file"]
    assert not (tmp_path / "run").exists()


def test_only_plain_image_files_in_the_root_count_as_loose_and_those_beside_class_folders_are_named(tmp_path, caplog):
    root = tmp_path / "mine"
    (root / "x.jpg").mkdir(parents=True)  # a folder with an image's name is a class folder, here an empty one
    (root / ".hidden.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    (root / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    with pytest.raises(DatasetError, match="^dataset.args.root: no .JPEG/.jpeg/.jpg/.png images listed in"):
        build_dataset("imagenet", ImageNetArgs(root=str(root), size=8))
    write_images(root / "x.jpg", 2, np.random.default_rng(2))
    write_images(root, 3, np.random.default_rng(3))  # 0.jpg, 1.png, 2.jpg beside the class folder
    with caplog.at_level(logging.WARNING):
        dataset = build_dataset("imagenet", ImageNetArgs(root=str(root), size=8))
    assert len(dataset) == 2 and dataset.n_classes == 1
    assert f"3 images in {root} itself are not in a class folder, so not read: 0.jpg, 1.png, 2.jpg" in caplog.text


def test_the_val_split_names_its_own_keys(tmp_path):
    write_images(tmp_path / "val", 2, np.random.default_rng(4))
    args = ImageNetArgs(root=str(tmp_path), split="val", val_root=str(tmp_path / "val"), size=8)
    with pytest.raises(DatasetError) as error:
        build_dataset("imagenet", args)
    assert str(error.value).startswith(f"dataset.args.val_root: the images lie in {tmp_path / 'val'} itself")
    assert str(error.value).endswith("or list them in dataset.args.val_list_file")
