"""The README's "Your own images": its command trains on a folder of class folders that is not ImageNet."""
import re
import shlex
from pathlib import Path

import numpy as np
from PIL import Image

import train
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
