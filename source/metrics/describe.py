"""One printed line per evaluation: the scores, the protocol they were computed under, and whether
published numbers compare with them (docs/evaluation.md)."""
from __future__ import annotations

from source.datasets import classes_text

from .groups import GROUPS
from .repeats import plus_minus

PUBLISHED_N = 50000  # generated images behind published IS/FID (IS over 10 splits of 5000; gSR: 3 x 50k)
PUBLISHED_PER_CLASS = 5000  # generated images per class behind sngan's intra-FID (calc_intra_FID.py)
# gSR's balanced references (StudioGAN's num_eval['test'] = 10000): CIFAR-10's test split, LSUN's 2000 per category
# of 5; iNaturalist's is not stated (its validation list holds fewer)
GSR_REFERENCE_IMAGES = {"cifar10": 10000, "lsun": 10000}


def describe(record: dict) -> str:
    """The scores (mean ± sample std with repeats), then the protocol and comparability."""
    protocol = record["protocol"]
    repeats = protocol.get("repeats", 1)
    values = []
    if "IS" in record:
        if repeats == 1 and protocol["splits"] == 1:
            values.append(f"IS {record['IS']:.3f} over 1 split (no spread)")
        elif repeats == 1:
            values.append(f"IS {record['IS']:.3f} ± {record['IS_std']:.3f} over {protocol['splits']} splits")
        else:
            values.append(f"IS {plus_minus(record, 'IS')} ({protocol['splits']} split(s) each)")
    if "FID" in record:
        values.append(f"FID {plus_minus(record, 'FID')}")
    if "KID" in record:
        values.append(describe_kid(record, repeats))
    if "intra_FID" in record:
        values.append(f"intra-FID {plus_minus(record, 'intra_FID')} over "
                      f"{classes_text(len(record['intra_FID_per_class']))} of {protocol['samples_per_class']} samples")
    if "group_FID" in record:
        values.append(describe_groups(record))
    spread = f"mean ± sample std over {repeats} repeats (seeds {protocol['seeds'][0]}..{protocol['seeds'][-1]}) | " \
        if repeats > 1 else ""
    return (f"{', '.join(values)} | {spread}N={protocol['n_samples']} generated vs {describe_reference(protocol)} | "
            f"G: {describe_generator(protocol)} | TF-Inception, weights {protocol['weights']} | "
            f"{comparability(protocol)}")


def describe_kid(record: dict, repeats: int) -> str:
    """KID with its spread over subsets, saying what that spread holds where the subset size was clipped to a set:
    every subset then holds the whole generated set (the spread is the reference draw's alone), or both whole
    sets (no spread). ``--repeats`` measures the generated samples' part."""
    protocol = record["protocol"]
    size, reference = protocol["kid_subset_size"], protocol.get("kid_reference_features")
    whole_generated = size == protocol["n_samples"]
    if repeats > 1:
        return f"KID {plus_minus(record, 'KID', 5)} ({protocol['kid_subsets']} subsets of {size} each)"
    if whole_generated and size == reference:
        return f"KID {record['KID']:.5f} (every subset both whole sets of {size}: no spread)"
    note = f"; each holds all {size} generated: ± the reference draw's spread only" if whole_generated else ""
    images = protocol["reference_key"].get("n_images")
    if reference and images and reference < images:  # a data set reference keeps the features of only so many
        note += f"; reference features of {reference} of its {images} images"
    return f"KID {record['KID']:.5f} ± {record['KID_std']:.5f} ({protocol['kid_subsets']} subsets of {size}{note})"


def describe_groups(record: dict) -> str:
    groups = record["protocol"]["groups"]
    parts = [f"{name} {plus_minus(record, f'group_FID.{name}')} ({len(groups[name])} classes)"
             for name in GROUPS if name in record["group_FID"]]
    empty = [name for name in GROUPS if not groups[name]]
    note = f"; no {'/'.join(empty)} classes" if empty else ""
    return f"group FID {', '.join(parts)}, mean {plus_minus(record, 'group_FID_mean')}{note}"


def describe_generator(protocol: dict) -> str:
    weights = "EMA weights" if protocol.get("generator") == "ema" else "raw weights"
    return f"{weights}, {describe_batchnorm(protocol)}"


def describe_batchnorm(protocol: dict) -> str:
    """How G's BatchNorm normalized (records from before g_batchnorm existed: running statistics)."""
    mode = protocol.get("g_batchnorm", "running")
    if mode == "batch":
        return f"BN batch statistics (batches of {protocol['g_batchnorm_batch_size']})"
    if mode == "standing":
        return (f"BN standing statistics ({protocol['standing_steps']} x {protocol['standing_batch_size']} samples, "
                f"seed {protocol['standing_seed']})")
    return "BN running statistics"


def describe_reference(protocol: dict) -> str:
    key = protocol["reference_key"]
    if not {"dataset", "split", "resolution", "n_images"} <= key.keys():
        return f"{protocol['reference']} (external statistics)"
    split = protocol.get("reference_split")
    role = "" if split is None else f", the balanced reference split '{split}'"
    long_tail = key.get("extra", {}).get("long_tail")
    tail = f", long-tailed training data (ratio {long_tail['ratio']:g})" if long_tail else ""
    return (f"{key['dataset']} {key['split']} {key['resolution']}px, {key['n_images']} images{tail}{role} "
            f"({protocol['reference']})")


def comparability(protocol: dict) -> str:
    reasons = []
    if protocol["n_samples"] < PUBLISHED_N:
        reasons.append(f"N={protocol['n_samples']} < {PUBLISHED_N} generated images")
    if protocol.get("intra_fid") == "classes" and protocol["samples_per_class"] < PUBLISHED_PER_CLASS:
        reasons.append(f"intra-FID over {protocol['samples_per_class']} < {PUBLISHED_PER_CLASS} samples per class "
                       f"(sngan's), biased upward")
    # gSR scores against a balanced reference split with IS over 1 split; SNGAN/SRGANs against training data, 10
    paper, published = ("gSR", 1) if protocol.get("reference_split") else ("SNGAN/SRGANs", 10)
    if protocol.get("splits", published) != published:
        reasons.append(f"IS over {protocol['splits']} split(s), {paper} published over {published}")
    key = protocol["reference_key"]
    published_images = GSR_REFERENCE_IMAGES.get(key.get("dataset")) if paper == "gSR" else None
    if published_images and key.get("n_images") != published_images:
        reasons.append(f"a reference of {key.get('n_images')} images, gSR's of {published_images}")
    if key.get("extra", {}).get("long_tail"):
        reasons.append("the reference is long-tailed training data; gSR scores against the balanced test split")
    if reasons:
        return f"not comparable with published numbers ({'; '.join(reasons)})"
    return f"published protocol of {paper}: comparable with published numbers computed against the same reference"
