"""The README's GPU speed table, made from the committed results of the GPU benchmark (never typed by hand).

    python -m benchmarks.gpu.summary            # print the table
    python -m benchmarks.gpu.summary --write    # replace the table in README.md

One column per results file (``benchmarks/results/gpu_<device>.json``; ``--quick`` runs are not results). A cell
holds a measured number, one computed from measured numbers ("extrapolated" where its section says so), or "not
measured" with the section's reason. A test checks that README.md holds the table these files give.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

from benchmarks.gpu.report import lookup
from benchmarks.gpu.small import agrees

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
START, END = "<!-- speed-table: made by python -m benchmarks.gpu.summary --write -->", "<!-- speed-table end -->"


def get(results: dict, path: str):
    """The value at a dotted ``path`` of ``results["sections"]``, or None."""
    return lookup(results["sections"], path)


def missing(results: dict, section: str) -> str:
    status = get(results, f"{section}.status")
    return "not run" if status is None else f"not measured ({status})"


def imagenet(setting: str) -> Callable[[dict], str]:
    def cell(results: dict) -> str:
        seconds = get(results, f"a_{setting}.seconds_per_2048_iteration_extrapolated")
        if seconds is None:
            bound = get(results, f"a_{setting}.seconds_per_2048_iteration_upper_bound_extrapolated")
            return missing(results, f"a_{setting}") + (f"; upper bound {bound:.2f} s" if bound else "")
        mfu = get(results, f"a_{setting}.mfu.value")
        known = f"MFU {100 * mfu:.0f} %" if mfu is not None else "MFU not known (no datasheet peak for this device)"
        return f"{seconds:.2f} s (extrapolated), {known}"
    return cell


def ratio_value(results: dict, name: str) -> float | None:
    return results["ratios"].get(name, {}).get("value")


def share(name: str, what: Callable[[dict], str] = lambda results: "") -> Callable[[dict], str]:
    """A ratio in percent, with what the results file says it covers and whether its inputs were extrapolated."""
    def cell(results: dict) -> str:
        value = ratio_value(results, name)
        if value is None:
            return "not measured"
        notes = [note for note in (what(results), "extrapolated" if name.endswith("_extrapolated") else "") if note]
        return f"{100 * value:.1f} %" + (f" ({', '.join(notes)})" if notes else "")
    return cell


def sr_convs(results: dict) -> str:
    return f"{get(results, 'b_sr_spectra.convs')} convs"


def sr_every(results: dict) -> str:
    return f"every {get(results, 'b_sr_spectra.sr_interval')} iterations"


def speedup(results: dict) -> str:
    """Fast over faithful; where fast's accumulation 2 was not measured, the least speed-up its upper bound gives."""
    measured = ratio_value(results, "imagenet128_fast_speedup_extrapolated")
    if measured is not None:
        return f"{measured:.2f}x (extrapolated)"
    least = ratio_value(results, "imagenet128_fast_speedup_lower_bound")
    return "not measured" if least is None else f"not measured; at least {least:.2f}x (against fast's upper bound)"


def fid(results: dict) -> str:
    ours, theirs = get(results, "c_fid.ours.total_s"), get(results, "c_fid.torch_fidelity.total_s")
    if ours is None or theirs is None:
        return missing(results, "c_fid")
    weights = " (random Inception weights: times only)" if get(results, "c_fid.random_weights") else ""
    return f"{ours:.1f} s against {theirs:.1f} s for {get(results, 'c_fid.n_images')} images{weights}"


def agreement(results: dict, variant: str) -> str:
    """Whether a variant's warm-up agreed with eager's (small.agrees: within the rounding yardstick's spread)."""
    section = get(results, "d_small_models") or {}
    agreed = agrees(section, variant)
    if agreed is None:  # runs before the seeding fix compared models built from other weights
        return "agreement not checked"
    yardstick = (section.get("agreement_limits") or {}).get("yardstick")
    if agreed:
        return f"agrees with eager{' as closely as ' + yardstick + ' does' if yardstick else ''}"
    largest = max(section["warmup_losses_difference_to_eager"][variant])
    judged = f"by {yardstick}'s spread" if yardstick else "no rounding yardstick measured" + eager_repeats(section)
    return f"**differs from eager** (losses up to {largest:.2g}; {judged})"


def eager_repeats(section: dict) -> str:
    """How far eager runs of the same seed in other processes strayed from the single one: the spread that runs
    before the yardstick can be read against."""
    if section.get("concurrent_variant") != "eager":
        return ""
    spreads = [max(run) for level in (section.get("concurrent") or {}).values()
               for run in level.get("warmup_losses_difference_to_single") or [] if run]
    return f", eager against itself in other processes: up to {max(spreads):.2g}" if spreads else ""


def small_models(results: dict) -> str:
    singles = get(results, "d_small_models.single") or {}
    rates = [f"{name} {run['g_iterations_per_s']:.1f}" + ("" if name == "eager" else f" ({agreement(results, name)})")
             for name, run in singles.items() if run.get("g_iterations_per_s")]
    return "; ".join(rates) or missing(results, "d_small_models")


def concurrent(results: dict) -> str:
    levels = get(results, "d_small_models.concurrent") or {}
    variant = get(results, "d_small_models.concurrent_variant")
    totals = [f"{n} runs: {level['g_iterations_per_s_total']:.1f}" for n, level in levels.items()
              if n != "1" and level.get("g_iterations_per_s_total")]
    return f"{variant}: " + "; ".join(totals) if totals else missing(results, "d_small_models")


def in_one_process(results: dict) -> str:
    levels = get(results, "d_small_models.in_one_process") or {}
    totals = [f"{n} runs: {level['g_iterations_per_s_total']:.1f}" for n, level in levels.items()
              if level.get("g_iterations_per_s_total")]
    variant = next(iter(levels.values()), {}).get("variant")
    return f"{variant}: " + "; ".join(totals) if totals else missing(results, "d_small_models.in_one_process")


def study_data(results: dict) -> str:
    data = get(results, "d_small_models.study_data_path") or {}
    if not data.get("g_iterations_per_s"):
        return "not measured" if get(results, "d_small_models.status") else "not run"
    loader = get(results, "d_small_models.loader_data_path.g_iterations_per_s")
    through_loader = f"; {loader:.1f} through the loader" if loader else ""
    return (f"{data['variant']} {data['g_iterations_per_s']:.1f} ({data['rate_to_resident_data']:.2f}x its rate on "
            f"resident data{through_loader})")


def biggan(results: dict) -> str:
    fp32, bf16 = get(results, "e_biggan.faithful.iteration_s"), get(results, "e_biggan.bf16.iteration_s")
    if fp32 is None:
        return missing(results, "e_biggan")
    graphs = get(results, "e_biggan.step-graphs.iteration_s")
    return (f"fp32 {fp32:.3f} s; bf16 " + (f"{bf16:.3f} s" if bf16 is not None else missing(results, "e_biggan"))
            + (f"; step graphs {graphs:.3f} s" if graphs is not None else "; step graphs not yet measured"))


def loaders(results: dict) -> str:
    prepared, jpeg = get(results, "f_loaders.prepared.on"), get(results, "f_loaders.jpeg.on")
    if prepared is None or jpeg is None:
        return missing(results, "f_loaders")
    return f"{prepared:.0f} against {jpeg:.0f} ({get(results, 'f_loaders.workers')} workers, dequantized)"


ROWS = [
    ("ImageNet-128 SR recipe, faithful fp32: s per batch-2048 iteration", imagenet("faithful")),
    ("the same, fast (bf16, channels_last, compile, ghost BN)", imagenet("fast")),
    ("fast over faithful (goal >= 1.5x at >= 35 % MFU)", speedup),
    ("one dynamic SR call on D's convs, share of a faithful iteration",
     share("sr_call_fraction_of_faithful_iteration_extrapolated", sr_convs)),
    ("SR at its interval, share of a fast iteration (goal <= 2 %)",
     share("sr_amortised_fraction_of_fast_iteration_extrapolated", sr_every)),
    ("one spectra snapshot, share of a faithful iteration", share("spectra_fraction_of_faithful_iteration_extrapolated")),
    ("FID end to end (generation, TF-Inception, statistics): ours against torch-fidelity", fid),
    ("32 px study model (ch 32, batch 64, n_dis 5), one run: G-iterations/s (goal >= 200)", small_models),
    ("the same, several runs at once as processes: G-iterations/s in all", concurrent),
    ("the same, several runs in one process (one CUDA stream each): G-iterations/s in all", in_one_process),
    ("the same, one run on the study's data path (held on the device): G-iterations/s", study_data),
    ("CIFAR-10-LT BigGAN iteration (batch 64, n_dis 5)", biggan),
    ("ImageNet loaders: prepared shards against JPEGs, images/s", loaders),
]


def load_results(folder: Path = RESULTS) -> list[dict]:
    results = [json.loads(path.read_text()) for path in sorted(folder.glob("gpu_*.json"))]
    return [result for result in results if not result.get("quick")]


def table(all_results: list[dict]) -> str:
    devices = [f"{r['protocol']['device']}, torch {r['protocol']['torch'].split('+')[0]}" for r in all_results]
    lines = ["| measured | " + " | ".join(map(escaped, devices)) + " |", "|---|" + "---|" * len(devices)]
    lines += [f"| {label} | " + " | ".join(escaped(cell(r)) for r in all_results) + " |" for label, cell in ROWS]
    return "\n".join(lines)


def escaped(text: str) -> str:
    """A cell's text as one markdown table cell: a results file's strings (a device name, an error) may hold '|',
    line breaks, markup or the README's table markers, which would break the table or the README around it."""
    return " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def with_table(readme: str, block: str) -> str:
    """``readme`` with the text between the markers replaced by ``block``."""
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md has no speed-table markers ({START} ... {END})")
    head, rest = readme.split(START, 1)
    return f"{head}{START}\n{block}\n{END}{rest.split(END, 1)[1]}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="replace the table in README.md")
    args = parser.parse_args(argv)
    try:
        block = table(load_results())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:  # a hand-edited or foreign file
        raise SystemExit(f"summary: {RESULTS}/gpu_*.json are not this benchmark's results "
                         f"({type(error).__name__}: {error})") from None
    if args.write:
        README.write_text(with_table(README.read_text(), block))
    print(block)


if __name__ == "__main__":
    main()
