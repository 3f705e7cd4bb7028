"""Ratios derived from the measured numbers, and the markdown report of a benchmark JSON."""
from __future__ import annotations

from math import prod
from pathlib import Path

from source.files import atomic_write_text
from source.provenance import describe

# name -> (numerator path, denominator paths (multiplied), what it says); paths are dotted keys of "sections".
A_FAITHFUL = "a_faithful.seconds_per_2048_iteration_extrapolated"
A_FAST = "a_fast.seconds_per_2048_iteration_extrapolated"
SR = "b_sr_spectra.sr_dynamic_edit_s"
SPECTRA = "b_sr_spectra.spectra_snapshot_s"
EAGER = "d_small_models.single.eager.g_iterations_per_s"
RATIOS = {
    "imagenet128_fast_speedup_extrapolated": (A_FAITHFUL, [A_FAST], "faithful / fast seconds per batch-2048 iteration"),
    # fast's upper bound is 2048/micro times its measured accumulation-1 iteration (each counting the fixed costs)
    "imagenet128_fast_speedup_lower_bound": (A_FAITHFUL, ["a_fast.seconds_per_2048_iteration_upper_bound_extrapolated"],
                                             "faithful / fast's upper bound: the least speed-up"),
    "sr_call_fraction_of_faithful_iteration_extrapolated": (SR, [A_FAITHFUL], "one SR call / faithful iteration"),
    "sr_call_fraction_of_fast_iteration_extrapolated": (SR, [A_FAST], "one SR call / fast iteration"),
    "sr_amortised_fraction_of_fast_iteration_extrapolated": (
        SR, [A_FAST, "b_sr_spectra.sr_interval"], "SR every sr_interval iterations / fast iteration"),
    "sr_edit_svd_over_gram": ("b_sr_spectra.sr_edit_math_s.svd", ["b_sr_spectra.sr_edit_math_s.gram"],
                              "one dynamic edit's arithmetic: by W's SVD / by the Gram matrix's eigh (SR's default)"),
    "spectra_fraction_of_faithful_iteration_extrapolated": (SPECTRA, [A_FAITHFUL], "one snapshot / faithful iteration"),
    "spectra_fraction_of_fast_iteration_extrapolated": (SPECTRA, [A_FAST], "one snapshot / fast iteration"),
    "fid_torch_fidelity_over_ours": ("c_fid.torch_fidelity.total_s", ["c_fid.ours.total_s"],
                                     "torch-fidelity's total seconds / ours, same images"),
    "small_fast_over_eager": ("d_small_models.single.fast.g_iterations_per_s", [EAGER], "G-iterations/s, one run"),
    "small_reduce_overhead_over_eager": ("d_small_models.single.fast-reduce-overhead.g_iterations_per_s", [EAGER],
                                         "G-iterations/s, one run"),
    "small_fp32_graphs_over_eager": ("d_small_models.single.fp32-graphs.g_iterations_per_s", [EAGER],
                                     "G-iterations/s, one run: CUDA graphs at the faithful fp32"),
    "small_step_graphs_over_eager": ("d_small_models.single.step-graphs.g_iterations_per_s", [EAGER],
                                     "G-iterations/s, one run: each step one CUDA graph, faithful fp32"),
    "small_compiled_step_graphs_over_eager": ("d_small_models.single.compiled-step-graphs.g_iterations_per_s", [EAGER],
                                              "G-iterations/s, one run: compiled, each step one CUDA graph, fp32"),
    "small_fast_step_graphs_over_eager": ("d_small_models.single.fast-step-graphs.g_iterations_per_s", [EAGER],
                                          "G-iterations/s, one run: bf16, channels_last, TF32, compiled, step graphs"),
    "biggan_bf16_speedup": ("e_biggan.faithful.iteration_s", ["e_biggan.bf16.iteration_s"],
                            "CIFAR-10-LT BigGAN: faithful / bf16 seconds per iteration"),
    "biggan_step_graphs_speedup": ("e_biggan.faithful.iteration_s", ["e_biggan.step-graphs.iteration_s"],
                                   "CIFAR-10-LT BigGAN: faithful / step-graphs seconds per iteration"),
}


def lookup(sections: dict, path: str):
    value = sections
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def derived_ratios(sections: dict) -> dict:
    ratios = {}
    for name, (numerator, denominators, what) in RATIOS.items():
        values = [lookup(sections, path) for path in (numerator, *denominators)]
        entry = {"numerator": numerator, "denominators": denominators, "what": what, "value": None}
        if all(isinstance(value, (int, float)) and value for value in values):
            entry["value"] = values[0] / prod(values[1:])
        else:
            entry["value_why"] = "not all of its numbers were measured (see the sections' errors)"
        ratios[name] = entry
    return ratios


def number(value, digits: int = 3) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(number(cell) for cell in row) + " |" for row in rows]


def settings(performance: dict | None) -> str:
    return ", ".join(f"{key.split('.')[-1]}={value}" for key, value in (performance or {}).items())


def seconds_list(values: list | None) -> str:
    return str([round(value, 2) for value in values or []])


# (row label, dotted key of a section (a) result, formatter)
IMAGENET_ROWS = (
    ("status", "status", None),
    ("performance settings", "performance", settings),
    ("notes", "notes", lambda notes: "; ".join(notes or [])),
    ("micro-batch", "micro_batchsize", None),
    ("BN group (ghost BN)", "bn_batchsize", None),
    ("warm-up s, accumulation 1", "accumulation_1.warmup_s", seconds_list),
    ("warm-up s, accumulation 2", "accumulation_2.warmup_s", seconds_list),
    ("median s per iteration, accumulation 1 (measured)", "accumulation_1.median_s", None),
    ("median s per iteration, accumulation 2 (measured)", "accumulation_2.median_s", None),
    ("graphs compiled while timing, accumulation 1", "accumulation_1.graphs_compiled_while_timing", None),
    ("graphs compiled while timing, accumulation 2", "accumulation_2.graphs_compiled_while_timing", None),
    ("images/s at accumulation 2 (measured)", "images_per_s_measured_at_accumulation_2", None),
    ("s per batch-2048 iteration (extrapolated)", "seconds_per_2048_iteration_extrapolated", None),
    ("images/s at batch 2048 (extrapolated)", "images_per_s_extrapolated", None),
    ("upper bound from accumulation 1 alone, s (extrapolated)", "seconds_per_2048_iteration_upper_bound_extrapolated",
     None),
    ("peak memory GiB (measured)", "peak_memory_bytes", lambda value: value and value / 2**30),
    ("model TFLOP per batch-2048 iteration (counted, scaled)", "flops_per_2048_iteration",
     lambda value: value and value / 1e12),
    ("MFU: counted FLOPs / extrapolated time / peak", "mfu.value", None),
    ("datasheet peak TFLOP/s (precision)", "mfu", lambda mfu: f"{number((mfu or {}).get('peak_tflops'))} "
                                                              f"({(mfu or {}).get('precision')})"),
)


def imagenet_rows(faithful: dict, fast: dict) -> list[list]:
    rows = []
    for label, key, formatter in IMAGENET_ROWS:
        values = [lookup(section, key) for section in (faithful, fast)]
        rows.append([label, *(formatter(value) if formatter else value for value in values)])
    return rows


def small_rows(small: dict) -> list[list]:
    # runs before the seeding fix recorded relative differences under another key
    differences = small.get("warmup_losses_difference_to_eager") or small.get(
        "warmup_losses_relative_difference_to_eager") or {}
    travels = small.get("warmup_travel_difference_to_eager") or {}
    rows = [[f"one run, {name}", run.get("g_iterations_per_s"),
             f"{run.get('status')}; cudagraph skips {run.get('cudagraph_skips')}; warm-up losses vs eager "
             f"{[number(d, 2) for d in differences.get(name) or []]}; weights' travel vs eager "
             f"{number(travels.get(name), 2)}; warm-up s {seconds_list(run.get('warmup_s'))}"]
            for name, run in (small.get("single") or {}).items()]
    rows += [[f"one run, {name}", None, why] for name, why in (small.get("skipped") or {}).items()]
    for key, path in (("study_data_path", "the study's data path"), ("loader_data_path", "the loader's data path")):
        data = small.get(key)
        if data:
            made = "held and dequantized on the device" if data.get("data_on_device") else \
                "read and dequantized per sample in the training process"
            rows.append([f"one run, {data.get('variant')}, {path}", data.get("g_iterations_per_s"),
                         f"{data.get('status')}; Fashion-MNIST's files ({data.get('images')} images), {made}; "
                         f"{number(data.get('rate_to_resident_data'), 2)}x the rate on one batch held on the device"])
    sr = (small.get("single") or {}).get("eager", {}).get("sr_call_s")
    if sr:
        calls = "; ".join(f"{mode} {number(sr.get(f'{mode}_device'), 2)} s on the device, "
                          f"{number(sr.get(f'{mode}_cpu'), 2)} s on the CPU" for mode in ("static", "rescale", "dynamic"))
        rows.append(["one SR call on the study's D", None, f"{calls} ({sr.get('cpu_threads')} CPU threads); static "
                                                           f"and rescale run n_dis times per SR iteration"])
    for parties, level in (small.get("concurrent") or {}).items():
        each = [round(rate, 1) if rate else rate for rate in level.get("g_iterations_per_s_each", [])]
        agreement = [max(d) if d else d for d in level.get("warmup_losses_difference_to_single") or []]
        rows.append([f"{parties} concurrent {small.get('concurrent_variant')}", level.get("g_iterations_per_s_total"),
                     f"each: {each}; warm-up losses vs the single run (largest): "
                     f"{[number(d, 2) for d in agreement]}"])
    for streams, level in (small.get("in_one_process") or {}).items():
        agreement = level.get("warmup_losses_difference_to_single") or []
        rows.append([f"{streams} runs of {level.get('variant')} in one process, one CUDA stream each",
                     level.get("g_iterations_per_s_total"),
                     f"{level.get('status')}; each {number(level.get('g_iterations_per_s'), 3)}; the first run's "
                     f"warm-up losses vs the single run's (largest), the others beside it on other seeds: "
                     f"{number(max(agreement), 2) if agreement else None}"])
    return rows


def fid_rows(fid: dict) -> list[list]:
    ours, theirs = fid.get("ours") or {}, fid.get("torch_fidelity") or {}
    keys = ("load_s", "generate_and_features_s", "statistics_and_distance_s", "inception_score_s",
            "generation_to_host_s", "calculate_metrics_s", "total_s", "fid", "fid_why", "inception_score",
            "inception_score_why")
    return [[key, ours.get(key, ""), theirs.get(key, "")] for key in keys if key in ours or key in theirs]


def errors(sections: dict) -> list[str]:
    return [f"- **{name}** ({section.get('status')}): {section.get('error')}"
            for name, section in sections.items() if section.get("status") != "ok" or section.get("error")]


def imagenet_lines(sections: dict) -> list[str]:
    lines = ["## (a) ImageNet-128 SRGANs recipe (configs/sr_imagenet.yaml's G and D, synthetic data on the device)", ""]
    lines += table(["", "faithful fp32", "fast"], imagenet_rows(sections.get("a_faithful", {}),
                                                               sections.get("a_fast", {})))
    lines += ["", "Extrapolated: t(2048) = t(1) + (2048 / micro - 1) * (t(2) - t(1)), from the measured medians "
              "at accumulation 1 and 2 (benchmarks/gpu/imagenet.py).", ""]
    settings = {name: sections.get(f"a_{name}", {}) for name in ("faithful", "fast")}
    return lines + profile_lines(settings, "iterations at accumulation 2")


def spectral_lines(spectral: dict) -> list[str]:
    lines = ["## (b) SR and spectra", ""]
    lines += table(["what", "seconds (measured, median)", "layers"], [
        ["dynamic SR call editing D's convs", spectral.get("sr_dynamic_edit_s"), spectral.get("convs")],
        *[[f"its arithmetic alone, by {solver}", (spectral.get("sr_edit_math_s") or {}).get(solver), spectral.get("convs")]
          for solver in ("gram", "svd")],
        ["spectra snapshot of G and D", spectral.get("spectra_snapshot_s"), str(spectral.get("spectra_layers"))]])
    return lines + [""]


def fid_lines(fid: dict) -> list[str]:
    lines = [f"## (c) FID of {fid.get('n_images')} generated images, end to end", "",
             f"Weights: {fid.get('weights')}. FID: {fid.get('fid_meaning')}; |ours - theirs| = "
             f"{number(fid.get('fid_abs_difference'))}.", ""]
    return lines + table(["", "ours", "torch-fidelity"], fid_rows(fid)) + [""]


def small_lines(small: dict) -> list[str]:
    lines = [f"## (d) 32 px models (the collapse study's base run), batch {small.get('batch')} (G "
             f"{2 * (small.get('batch') or 0)}), n_dis {small.get('n_dis')}, ch {small.get('width')}", ""]
    arithmetic = small.get("arithmetic") or {}
    flops, peak = arithmetic.get("flops_per_g_iteration"), arithmetic.get("peak_tflops")
    if flops:
        lines += [f"One G-iteration is {number(flops / 1e9, 3)} GFLOP of the models' arithmetic (counted: "
                  f"FlopCounterMode, eager, on the CPU); the {arithmetic.get('precision')} datasheet peak of this device "
                  f"is {number(peak)} TFLOP/s, so no arrangement of runs does more than "
                  f"{number(peak * 1e12 / flops if peak else None, 3)} G-iterations/s in all at this precision.", ""]

    def share(rate):  # of the peak, at the counted FLOPs
        return number(rate * flops / (peak * 1e12), 2) if rate and flops and peak else None

    rows = [[label, rate, share(rate), note] for label, rate, note in small_rows(small)]
    lines += table(["run", "G-iterations/s (measured)", "share of the peak", "note"], rows) + [""]
    return lines + profile_lines(small.get("single") or {})


def profile_lines(single: dict, over: str = "iterations") -> list[str]:
    """Where a G-iteration's time goes, per profiled variant or setting (profiling.kernel_profile)."""
    lines = []
    for name, run in single.items():
        profile = run.get("kernel_profile")
        if not profile:
            continue
        if "error" in profile:
            lines.append(f"- {name}: not profiled ({profile['error']})")
            continue
        wall, busy = profile.get("wall_ms_per_g_iteration"), profile.get("device_busy_ms_per_g_iteration")
        busy_text = ("no device (CPU)" if busy is None else "no device events seen" if not busy or not wall
                     else f"the device busy {number(busy, 3)} ms ({number(100 * busy / wall, 2)} %)")
        top = ", ".join(f"{entry['name']} {number(entry['ms'], 2)} ms ({number(entry['calls'])}x)"
                        for entry in profile.get("top") or [])
        lines.append(f"- {name}: {number(wall, 3)} ms of wall per G-iteration, {busy_text}; launches per G-iteration "
                     f"{profile.get('launches_per_g_iteration')}; most time ({profile.get('top_is')}): {top}")
    if not lines:
        return []
    return [f"Where a G-iteration's time goes (torch.profiler over {over} after the timing window, not timed):",
            "", *lines, ""]


def biggan_lines(biggan: dict) -> list[str]:
    lines = ["## (e) CIFAR-10-LT BigGAN iteration (configs/gsr/cifar10_lt_biggan.yaml: batch 64, n_dis 5, LeCam, "
             "DiffAugment, gSR, EMA)", ""]
    settings = ("faithful", "bf16", "step-graphs")
    rows = [[name, biggan.get(name, {}).get("iteration_s"), seconds_list(biggan.get(name, {}).get("iterations_s")),
             losses_list(biggan.get(name, {}).get("warmup_losses"))] for name in settings]
    lines += table(["setting", "seconds per iteration (median)", "timed iterations", "warm-up losses (D, G)"], rows)
    return lines + [""] + profile_lines({name: biggan.get(name, {}) for name in settings}, "one iteration")


def losses_list(losses: list | None) -> str | None:
    if not losses:
        return None
    return ", ".join(f"{step['loss_dis']:.4f}/{step['loss_gen']:.4f}" for step in losses)


def loader_lines(loaders: dict) -> list[str]:
    lines = [f"## (f) Loaders with {loaders.get('workers')} workers: {loaders.get('images')} generated JPEGs "
             f"({number(loaders.get('jpeg_kB'))} kB mean) at 128 px, micro-batch 32, {loaders.get('epochs')} epoch "
             "timed after a warm-up batch (each epoch starts its workers: the prepared figures are lower bounds)", "",
             f"One-time preparation: {number(loaders.get('prepare_images_per_s'))} images/s.", ""]
    rows = [[name, (loaders.get("jpeg") or {}).get(name), (loaders.get("prepared") or {}).get(name),
             (loaders.get("ratio") or {}).get(name)] for name in ("on", "off")]
    return lines + table(["dequantization", "JPEG images/s", "prepared images/s", "prepared / JPEG"], rows) + [""]


SECTION_LINES = {"b_sr_spectra": spectral_lines, "c_fid": fid_lines, "d_small_models": small_lines,
                 "e_biggan": biggan_lines, "f_loaders": loader_lines}


def code_line(protocol: dict) -> str:
    """The code version the results were measured with; a merge of runs at several names each (see its runs)."""
    codes = sorted({describe(run["code"]) for run in protocol.get("runs") or [] if isinstance(run.get("code"), dict)})
    if len(codes) > 1:
        return f"measured at several code versions ({', '.join(codes)}: see the protocol's runs)"
    return describe(protocol["code"]) if isinstance(protocol.get("code"), dict) else "code version not recorded"


def write_markdown(result: dict, path: Path) -> None:
    atomic_write_text(path, markdown(result))


def markdown(result: dict) -> str:
    """The results' report (a KeyError or TypeError for results not as bench.py writes them)."""
    protocol, sections = result["protocol"], result["sections"]
    lines = [f"# GPU benchmark: {protocol['device']}", "",
             f"torch {protocol['torch']} (CUDA {protocol['cuda']}), Python {protocol['python']}, {protocol['date']}, "
             f"quick={result['quick']}, total wall {protocol['total_wall_s']} s, "
             f"{code_line(protocol)}. "
             f"Timing: {protocol['timing']}.", ""]
    if result.get("complete") is False:
        lines += [f"**Incomplete**: written after {', '.join(sections)}; the sections after it had not run.", ""]
    if protocol.get("gpu_tests"):
        tests = protocol["gpu_tests"]
        lines += [f"GPU-only tests (run.sh --gpu-tests): {tests['summary'] or 'no summary line'}, pytest exit {tests['exit']}"
                  f"{'' if tests['passed'] else ' (not passed: no setting they test is chosen for a study)'}.", ""]
    if protocol.get("section_dates"):  # merged from several runs (benchmarks/gpu/merge.py)
        lines += ["Merged from runs on the same device and torch; each section's date: " + ", ".join(
            f"{name} {date}" for name, date in protocol["section_dates"].items()) + ". A ratio may divide numbers "
            "of two of them.", ""]
    if {"a_faithful", "a_fast"} & set(sections):
        lines += imagenet_lines(sections)
    for name, render in SECTION_LINES.items():
        lines += render(sections[name]) if name in sections else []
    lines += ["## Ratios (computed from the numbers above)", ""]
    lines += table(["ratio", "value", "what"], [[name, entry["value"], entry["what"]]
                                                 for name, entry in result["ratios"].items()])
    lines += [""]
    problems = errors(sections)
    lines += ["## Sections that did not finish cleanly", "", *problems, ""] if problems else []
    return "\n".join(lines) + "\n"
