"""Measures of the Fashion-MNIST-LT gSR experiment (docs/gsr.md), from the run folders only.

    python docs/gsr/summarize.py RUN [RUN ...] [--iterations 1000 2000 3000] [--samples-per-class 200] \
        [--out runs/gsr_summary.json]

For every run and snapshot iteration:
- sigma: from RUN/class_spectra.jsonl, the exact sigma_max of each class's grouped gain deviation and bias,
  max over G's 6 conditional BNs, averaged over head classes (0, 1: 6000, 3596 images) and tail classes
  (8, 9: 100, 60 images) as in docs/reference/gsr_probe.md;
- the Fashion-MNIST classifier's per-class accuracy and diversity of conditional samples (source/metrics/
  classifier.py: class_report) and a classifier-feature FID per group against the balanced test split.
Groups are scaled to this data (gSR's > 100 / <= 40 thresholds leave Fashion-MNIST-LT's few group empty):
many > 1000 (classes 0-3), medium 201..1000 (4-6), few <= 200 training images (7-9: 166, 100, 60).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from figures.common import command_line, require_run_folder  # noqa: E402
from source.datasets import FashionMNISTArgs, build_dataset  # noqa: E402
from source.metrics.classifier import class_report, class_samples, dataset_features, load_classifier  # noqa: E402
from source.metrics.fid import feature_statistics, frechet_distance  # noqa: E402
from source.metrics.groups import class_groups  # noqa: E402
from source.training.evaluate import load_generator  # noqa: E402
from source.training.runlog import read_jsonl  # noqa: E402

HEAD, TAIL = (0, 1), (8, 9)
MANY_ABOVE, FEW_AT_MOST = 1000, 200


def sigma_summary(record: dict) -> dict:
    summary = {}
    for key in ("gamma", "beta"):
        per_class = np.max(np.asarray(record[key]), axis=0)  # max over layers
        summary[f"sigma_{key}_head"] = float(per_class[list(HEAD)].mean())
        summary[f"sigma_{key}_tail"] = float(per_class[list(TAIL)].mean())
        summary[f"sigma_{key}_per_class"] = per_class.tolist()
    return summary


def group_fids(gen, classifier, real, groups: dict, samples_per_class: int, seed: int) -> dict:
    features, _, labels = class_samples(gen, classifier, samples_per_class, seed, 100, torch.device("cpu"))
    fids = {}
    for name, members in groups.items():
        fake = features[np.isin(labels, members)]
        reference = real[0][np.isin(real[1], members)]
        fids[name] = frechet_distance(*feature_statistics(fake), *feature_statistics(reference))
    return fids


def measure(run: Path, iteration: int, classifier, test, real, samples_per_class: int) -> dict | None:
    spectra = {r["iteration"]: r for r in read_jsonl(run / "class_spectra.jsonl")}
    snapshot = run / "snapshots" / f"generator_iter_{iteration}.pt"
    if iteration not in spectra or not snapshot.is_file():
        return None
    counts = spectra[iteration]["class_counts"]
    gen = load_generator(str(snapshot), torch.device("cpu")).gen
    report = class_report(gen, classifier, test, samples_per_class=samples_per_class, seed=0, train_counts=counts,
                          many_above=MANY_ABOVE, few_at_most=FEW_AT_MOST, kid_subsets=20)
    groups = class_groups(counts, MANY_ABOVE, FEW_AT_MOST)
    return {"run": run.name, "iteration": iteration, **sigma_summary(spectra[iteration]),
            "accuracy_per_class": report["accuracy_per_class"], "diversity_per_class": report["diversity_per_class"],
            "groups": report["groups"], "classifier_FID": report["classifier_FID"],
            "group_classifier_FID": group_fids(gen, classifier, real, groups, samples_per_class, seed=0),
            "group_classes": groups}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--iterations", nargs="+", type=int, default=[1000, 2000, 3000])
    parser.add_argument("--samples-per-class", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("runs/gsr_summary.json"))  # the committed: docs/gsr/data/
    args = parser.parse_args(argv)
    for run in args.runs:
        require_run_folder(run)
    torch.set_num_threads(1)
    classifier, _ = load_classifier()
    test = build_dataset("fashion_mnist", FashionMNISTArgs(split="test", dequantize=False))
    real = dataset_features(classifier, test)
    rows = [row for run in args.runs for it in args.iterations
            if (row := measure(run, it, classifier, test, real, args.samples_per_class)) is not None]
    if not rows:  # nothing written: an earlier summary at --out stays
        found = {run.name: sorted(r["iteration"] for r in read_jsonl(run / "class_spectra.jsonl")) for run in args.runs}
        raise ValueError(f"no run has a generator export and class spectra at iterations {args.iterations} (class "
                         f"spectra at: {found}); give --iterations")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print("| run | iteration | σγ head | σγ tail | σβ head | σβ tail | acc many/med/few | div many/med/few | "
          "cls-FID many/med/few |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        g, f = r["groups"], r["group_classifier_FID"]
        print(f"| {r['run']} | {r['iteration']} | {r['sigma_gamma_head']:.2f} | {r['sigma_gamma_tail']:.2f} | "
              f"{r['sigma_beta_head']:.2f} | {r['sigma_beta_tail']:.2f} | "
              + "/".join(f"{g[n]['accuracy']:.2f}" for n in ("many", "medium", "few")) + " | "
              + "/".join(f"{g[n]['diversity']:.2f}" for n in ("many", "medium", "few")) + " | "
              + "/".join(f"{f[n]:.1f}" for n in ("many", "medium", "few")) + " |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(command_line(main))  # a user error or Ctrl-C: one line
