"""Config errors through the public entry point: one line naming file and key, exit code 2."""
from pathlib import Path

import pytest
import yaml

import train
from source.config import ConfigError, config_from_dict, load_config
from source.training.evaluate import check_reference_split
from source.typed import config_differences

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def run_train(argv, capsys):
    code = train.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_config(tmp_path, mutate) -> Path:
    raw = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    mutate(raw)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c["updater"].update(n_dsi=5), "updater.n_dsi: unknown key (did you mean 'n_dis'?)"),
    (lambda c: c.update(batchsize="many"), "batchsize: expected int, got str 'many'"),
    (lambda c: c["updater"].update(apply_SR="yes"), "updater.apply_SR: expected bool or 'auto', got str 'yes'"),
    (lambda c: c["models"]["generator"]["args"].update(chanels=1),
     "models.generator.args.chanels: unknown key (did you mean 'channels'?)"),
    (lambda c: c["dataset"]["args"].update(rooot="x"), "dataset.args.rooot: unknown key (did you mean 'root'?)"),
    (lambda c: c["models"]["discriminator"].update(name="SNResNetProjectionDiscrimnator"),
     "did you mean 'SNResNetProjectionDiscriminator'?"),
    (lambda c: c.update(micro_batchsize=24),
     "batchsize: 32 is not divisible by micro_batchsize x world size = 24 x 1 = 24"),
    (lambda c: c.update(gen_batchsize=48),
     "gen_batchsize: 48 is not divisible by micro_batchsize x world size = 32 x 1 = 32"),
    (lambda c: c.update(micro_batchsize=0), "micro_batchsize: must be positive, got 0"),
    (lambda c: c.update(evaluation_interval=0), "must be positive, got 0 (no evaluation: evaluation.metrics=[])"),
    (lambda c: c["updater"].update(collapse={"threshold": 1.5}), "updater.collapse: threshold must be in (0, 1)"),
    (lambda c: c.update(num_workers=-1), "num_workers: must be >= 0, got -1"),
    (lambda c: c.update(seed=2**65), "seed: must be in [0, 2^32), got 36893488147419103232"),
    (lambda c: c["updater"]["sr"].update(mode="dynamc"), "updater.sr.mode: expected 'dynamic' or 'static'"),
    (lambda c: c.pop("models"), "models: missing required key"),
])
def test_config_errors_are_one_line_naming_file_and_key(tmp_path, capsys, mutate, expected):
    path = write_config(tmp_path, mutate)
    code, out, err = run_train(["--config", str(path), "--dry-run"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(path) in err and expected in err


def test_an_integer_of_more_digits_than_python_reads_is_a_one_line_error(tmp_path, capsys):
    path = write_config(tmp_path, lambda c: c.update(iteration=12345))
    path.write_text(path.read_text().replace("12345", "9" * 5000))
    code, _, err = run_train(["--config", str(path), "--dry-run"], capsys)
    assert code == 2 and err.count("\n") == 1 and "a value cannot be read (Exceeds the limit" in err
    code, _, err = run_train(["--config", str(CONFIGS / "demo.yaml"), "--set", "seed=" + "9" * 5000, "--dry-run"],
                             capsys)
    assert code == 2 and err.count("\n") == 1 and "--set seed: Exceeds the limit" in err


@pytest.mark.parametrize("rank, reported", [(0, True), (1, False)])
def test_under_torchrun_only_rank_0_reports_a_config_error(tmp_path, capsys, monkeypatch, rank, reported):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    path = write_config(tmp_path, lambda c: c["updater"].update(n_dsi=5))
    code, _, err = run_train(["--config", str(path)], capsys)
    assert code == 2 and ("updater.n_dsi: unknown key" in err) == reported


def test_override_errors_and_yaml_typing(capsys):
    code, _, err = run_train(["--config", str(CONFIGS / "demo.yaml"), "--set", "updater.n_dis", "--dry-run"], capsys)
    assert code == 2 and "expected KEY=VALUE" in err
    # a --set split by spaces: argparse alone said "unrecognized arguments: 3"
    for split in (["updater.n_dis", "3"], ["updater.n_dis=", "3"], ["updater.n_dis", "=3"]):
        with pytest.raises(SystemExit) as exit_code:  # argparse's exit
            train.main(["--config", str(CONFIGS / "demo.yaml"), "--set", *split, "--dry-run"])
        err = capsys.readouterr().err
        assert exit_code.value.code == 2 and f"error: --set {' '.join(split)}: write KEY=VALUE as one argument" in err
    code, out, _ = run_train(["--config", str(CONFIGS / "demo.yaml"), "--set", "updater.n_dis = 3", "--dry-run"],
                             capsys)
    assert code == 0 and "n_dis 3," in out
    # a bad value that --set gave is the command line's, not the file's
    for override, expected in (("iteration=abc", "error: --set iteration: expected int, got str 'abc'"),
                               ("models.generator.args={ch: x}", "error: --set models.generator.args.ch: expected int"),
                               ("updater.n_dsi=3", "error: --set updater.n_dsi: unknown key (did you mean 'n_dis'?)"),
                               # the faulty key above the override, a list's item, an argument checked with its
                               # neighbours, a consistency check across keys
                               ("updater.srr.mode=static", "error: --set updater.srr: unknown key"),
                               ("evaluation.metrics=[1]", "error: --set evaluation.metrics[0]: expected"),
                               ("models.generator.args.ch=-3", f"error: {CONFIGS / 'demo.yaml'} with --set "
                                "models.generator.args.ch: models.generator.args: ResNetGenerator"),
                               ("batchsize=7", "error: --set batchsize: 7 is not divisible"),
                               ("micro_batchsize=48", f"error: {CONFIGS / 'demo.yaml'} with --set micro_batchsize: "
                                "batchsize: 32 is not divisible")):
        code, _, err = run_train(["--config", str(CONFIGS / "demo.yaml"), "--set", override, "--dry-run"], capsys)
        assert code == 2 and err.startswith(expected), err
    # the file's own fault is named with the file, and with what --set changed beside it; without --set, the file's
    demo = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    with pytest.raises(ConfigError, match=r"^bad\.yaml with --set adam_G\.alpha: adam_G: "):
        config_from_dict({**demo, "adam_G": {**demo["adam_G"], "beta1": 1.5}}, ["adam_G.alpha=1e-3"], source="bad.yaml")
    with pytest.raises(ConfigError, match=r"^bad\.yaml: iteration: "):
        config_from_dict({**demo, "iteration": float("nan")}, source="bad.yaml")
    config = load_config(CONFIGS / "demo.yaml", ["adam_D.alpha=1e-3", "updater.apply_SR=auto", "seed=7"])
    assert config.adam_D.alpha == 1e-3 and config.updater.apply_SR == "auto" and config.seed == 7


def test_missing_imagenet_root_gives_hint(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default run folder, results/..., is claimed before the data are read
    argv = ["--config", str(CONFIGS / "sr_imagenet.yaml"), "--set", "dataset.args.root=/nonexistent/imagenet"]
    code, _, err = run_train(argv, capsys)
    assert code == 2 and "/nonexistent/imagenet" in err and "ImageNet" in err and "Traceback" not in err


def test_dry_run_reports_missing_root_without_failing(capsys):
    argv = ["--config", str(CONFIGS / "sr_imagenet.yaml"), "--set", "dataset.args.root=/nonexistent/imagenet",
            "--dry-run"]
    code, out, _ = run_train(argv, capsys)
    assert code == 0
    assert "NOT AVAILABLE" in out and "2048 = 32 (micro) x 1 (world size) x 64 (accumulation steps)" in out
    assert "generator" in out and "parameters" in out
    assert "performance  the faithful default (fp32, eager)" in out and "bn_batchsize" not in out


def test_dry_run_shows_the_fast_settings_and_ghost_batchnorm(capsys):
    """A new user could not check the README's fast setting before a run: no row said it."""
    argv = ["--config", str(CONFIGS / "sr_imagenet.yaml"), "--set", "dataset.args.root=/nonexistent/imagenet",
            "--dry-run", "--set", "performance.amp=bf16", "--set", "performance.channels_last=true",
            "--set", "micro_batchsize=256", "--set", "bn_batchsize=32", "--set", "device=cpu"]
    code, out, _ = run_train(argv, capsys)
    assert code == 0 and "2048 = 256 (micro) x 1 (world size) x 8 (accumulation steps); G's BatchNorm over " \
        "groups of 32 (bn_batchsize)" in out
    assert "performance  amp bf16, channels_last True (note: bf16 autocast on a CPU" in out


def test_bad_dataset_values_are_refused_by_the_config_whatever_the_files(capsys, tmp_path):
    """A dry run said "data NOT AVAILABLE" and exit 0 for a value the run refuses (exit 2): values are the config's."""
    for bad, message in [("long_tail.ratio=0.5", "dataset.args.long_tail.ratio: must be a finite number >= 1"),
                         ("split=val", "dataset.args.val_root: split 'val' needs the folder of validation images")]:
        for dry in (["--dry-run"], ["--out", str(tmp_path / "run")]):
            argv = ["--config", str(CONFIGS / "sr_imagenet.yaml"), "--set", "dataset.args.root=/nonexistent", "--set",
                    f"dataset.args.{bad}"] + dry
            code, out, err = run_train(argv, capsys)
            assert code == 2 and message in err and "NOT AVAILABLE" not in out and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_dry_run_checks_what_the_run_would_refuse_at_once(capsys):
    """It passed data smaller than one micro-batch and evaluation settings the run refuses in its first second."""
    small = ["--config", str(CONFIGS / "demo.yaml"), "--dry-run", "--set", "dataset.name=synthetic", "--set",
             "dataset.args.count=24"]
    code, out, _ = run_train(small, capsys)
    assert code == 0 and "NOT AVAILABLE: dataset: 24 images, fewer than one global micro-batch of 32 x 1 ranks" in out
    code, _, err = run_train(small[:3] + ["--set", "evaluation.metrics=[is]", "--set", "evaluation.n_samples=5", "--set",
                                          "evaluation.splits=10"], capsys)
    assert code == 2 and "evaluation.splits: 10 must be between 1 and n_samples=5" in err


def test_world_size_enters_divisibility_check():
    with pytest.raises(ConfigError, match="2048 is not divisible by micro_batchsize x world size = 32 x 3 = 96"):
        load_config(CONFIGS / "sr_imagenet.yaml", world_size=3)


@pytest.mark.parametrize("overrides, message", [
    (["device=cuda:1"], "device: cuda:1 names one GPU, but torchrun started 4 ranks"),  # NCCL: all ranks on it
    (["performance.compile=true", "performance.compile_mode=reduce-overhead"],
     r"performance.compile_mode reduce-overhead: its CUDA graphs are not used with DDP \(world size 4\)"),
])
def test_what_torchrun_ranks_cannot_share_is_refused(overrides, message):
    load_config(CONFIGS / "sr_imagenet.yaml", overrides, world_size=1)  # one process: fine
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "sr_imagenet.yaml", overrides, world_size=4)
    load_config(CONFIGS / "sr_imagenet.yaml", ["device=cuda", "performance.compile=true"], world_size=4)


def test_synthetic_override_adapts_to_the_models():
    config = load_config(CONFIGS / "sr_imagenet.yaml", ["dataset.name=synthetic"])
    args = config.dataset.args
    assert (args.size, args.channels, args.n_classes) == (128, 3, 1000)


def test_synthetic_stand_in_data_keep_the_recipes_long_tail_and_take_nested_sets():
    """A gSR config on synthetic data stays long-tailed (ratio and seed; n_max counted the file's images); what --set
    names under dataset.args is the user's, whatever its value (a nested one used to share the file's mapping and be
    dropped as the file's); the file's evaluation.reference_split becomes the new data set's held-out split."""
    def load(name: str, *overrides: str):
        return load_config(CONFIGS / name, ["dataset.name=synthetic", *overrides])

    lsun = load("gsr/lsun_lt_sngan.yaml")
    assert (lsun.dataset.args.long_tail.ratio, lsun.dataset.args.long_tail.n_max) == (100, None)
    assert lsun.evaluation.reference_split == "test"  # LSUN's eval: the synthetic data's held-out split is test
    chosen = load("gsr/lsun_lt_sngan.yaml", "dataset.args.long_tail.n_max=50000",
                  "dataset.args.long_tail.ratio=10")
    assert (chosen.dataset.args.long_tail.ratio, chosen.dataset.args.long_tail.n_max) == (10, 50000)
    assert load("gsr/cifar10_lt_sngan.yaml").dataset.args.long_tail.ratio == 100
    with pytest.raises(ConfigError, match="evaluation.reference_split"):  # the user's own choice is checked, not moved
        check_reference_split(load("gsr/lsun_lt_sngan.yaml", "evaluation.reference_split=eval"))
    moved = load_config(CONFIGS / "gsr/cifar10_lt_sngan.yaml", ["dataset.name=lsun", "dataset.args.root=/x"])
    assert moved.evaluation.reference_split == "eval" and moved.dataset.args.long_tail.ratio == 100


def test_config_differences_lists_changed_leaves():
    old = {"updater": {"apply_SR": False, "n_dis": 1}, "seed": 0}
    new = {"updater": {"apply_SR": True, "n_dis": 1}, "seed": 0}
    assert config_differences(old, new) == ["updater.apply_SR: false -> true"]


def test_broken_yaml_names_where_it_breaks(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("iteration: 10\nupdater:\n  n_dis: 5\n   apply_SR: true\n")
    code, _, err = run_train(["--config", str(path), "--dry-run"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"{path}: not valid YAML at line 4, column " in err and "mapping values are not allowed here" in err


def test_a_study_file_given_to_train_py_is_named_so(capsys):
    code, _, err = run_train(["--config", str(CONFIGS / "collapse" / "gpu_study.yaml"), "--dry-run"], capsys)
    assert code == 2 and "gpu_study.yaml is a study file" in err and "python -m source.study" in err
    assert "fmnist_cifar_recipe_ch32.yaml" in err  # its base: the config to train instead


def test_a_dry_run_of_a_resume_says_what_the_resume_would(tmp_path, capsys):
    from test_training import tiny_argv

    assert train.main(tiny_argv(tmp_path / "run", 2)) == 0
    snapshot = str(tmp_path / "run" / "snapshots" / "snapshot_iter_2.pt")
    code, out, _ = run_train(["--resume", snapshot, "--dry-run"], capsys)  # the run is done: it said "in place"
    assert code == 0 and f"resumes {snapshot} at iteration 2: the run has trained its 2 iterations, nothing" in out
    code, out, _ = run_train(["--resume", snapshot, "--set", "iteration=4", "--set", "updater.sr.interval=3",
                              "--dry-run"], capsys)
    assert code == 0 and f"resumes {snapshot} at iteration 2\n" in out
    assert "  config change: iteration: 2 -> 4" in out and "  config change: updater.sr.interval: 2 -> 3" in out
