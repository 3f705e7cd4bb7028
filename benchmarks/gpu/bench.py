"""The toolkit's GPU benchmark: every GPU number of the README, on synthetic data (README.md beside it).

    python -m benchmarks.gpu.bench [--quick] [--out DIR] [--sections a_fast,c_fid] [--budget c_fid=120]
    bash benchmarks/gpu/run.sh [same options]      # on the device machine (benchmarks/gpu/README.md)

Sections, each a child process with its own time budget (a section that fails or runs out records why and
the next one starts): (a) the ImageNet-128 recipe at the faithful fp32 and the fast setting, (b) one SR call
and one spectra snapshot against it, (c) FID end to end, ours and torch-fidelity's, (d) the 32 px models'
G-iterations/s, alone and concurrent, (e) one CIFAR-10-LT BigGAN iteration with every gSR term, (f) the prepared-shard and JPEG loaders' images/s
with all the machine's cores. Writes gpu_<device>.json and .md into --out after every section ("complete": false
until the last; the running section's own record in gpu_<device>-running/, so a call cut short returns what it
measured). ``--quick`` shrinks every size so that the whole run takes about two minutes on a 2-core CPU, through the
same code paths.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.gpu.common import (MINIMUM_S, ROOT, Partial, environment, gpu_tests, pick_device,  # noqa: E402
                                   progress, run_child, slug)
from benchmarks.gpu.imagenet import FAITHFUL, FAST, GLOBAL_BATCH  # noqa: E402
from benchmarks.gpu.report import derived_ratios, write_markdown  # noqa: E402
from source.files import atomic_write_text  # noqa: E402
from source.provenance import describe  # noqa: E402

# Seconds per section, from the H200 runs (benchmarks/results/gpu_nvidia-h200.json) on a cold compile cache:
# compiling the 128 px G and D took 136-193 s for accumulation 1 and 126 s again for accumulation 2 (SN's power
# step off after the first micro-batch is another graph: (a) fast took 356 s in all); (c) makes two passes over 50k
# images; (d) took 227 s for eager, step graphs, the study's data path, 4 and 8 runs in one process, 4 and 16
# processes, with a compiled variant cut at its budget: its TF32, bf16 and compiled variants need more.
# 850 s in all: more than one lent GPU call (600 s), so there the sections run in two calls,
# `--sections a_faithful,a_fast,b_sr_spectra` and `--sections c_fid,d_small_models,e_biggan,f_loaders`, and
# `python -m benchmarks.gpu.merge` folds the second run's JSON into the first's.
BUDGETS_S = {"a_faithful": 35, "a_fast": 380, "b_sr_spectra": 20, "c_fid": 80, "d_small_models": 260,
             "e_biggan": 50, "f_loaders": 25}
# --quick (CPU, the tests): budgets only against a hang, at least 5x what each section takes on a 2-core Xeon
QUICK_BUDGETS_S = {"a_faithful": 90, "a_fast": 90, "b_sr_spectra": 60, "c_fid": 90, "d_small_models": 240,
                   "e_biggan": 60, "f_loaders": 60}
TOTAL_BUDGET_S = {False: sum(BUDGETS_S.values()), True: 540}
# the child function of each section; (d) only starts and collects worker processes, so it runs in this one
CHILD_OF = {"a_faithful": "a", "a_fast": "a", "b_sr_spectra": "b", "c_fid": "c", "e_biggan": "e", "f_loaders": "f"}


def child_functions() -> dict:
    from benchmarks.gpu import biggan, fid, imagenet, loaders, small_worker

    return {"a": imagenet.run_setting, "b": imagenet.run_spectral, "c": fid.run, "d_worker": small_worker.worker,
            "e": biggan.run, "f": loaders.run}


# Sizes on a GPU, and with --quick: tiny, every code path in about two minutes on a 2-core CPU.
SIZES = {
    False: {"width": None, "warmup": 2, "timed": 3, "faithful_micro": [32], "fast_micro": [256, 128, 64], "bn": 32,
            "repeats": 3, "fid_images": 50000, "fid_reference": 2500, "fid_batch": 500, "splits": 10,
            "small_width": None, "small_batch": 64, "small_warmup": 8, "window_s": 4.0, "concurrency": [1, 4, 16],
            "in_one_process": [4, 8],  # study_settings.MOST_PER_PROCESS: a CUDA error in a process ends all its runs
            "study_images": 60000, "worker_cap_s": 75, "biggan_batch": 64, "loader_images": 768, "loader_workers": None},
    True: {"width": 4, "warmup": 1, "timed": 2, "faithful_micro": [2], "fast_micro": [4], "bn": 2,
           "repeats": 2, "fid_images": 2, "fid_reference": 2, "fid_batch": 2, "splits": 1,
           "small_width": 8, "small_batch": 8, "small_warmup": 5, "window_s": 0.5, "concurrency": [1, 2],
           "in_one_process": [2],
           "study_images": 256, "worker_cap_s": 40, "biggan_batch": 8, "loader_images": 64, "loader_workers": 2},
}


def imagenet_plans(size: dict, cpu_quick: bool) -> dict:
    common = {"width": size["width"], "warmup": size["warmup"], "timed": size["timed"], "bn_batchsize": size["bn"],
              "flops_micro": size["faithful_micro"][0]}
    fast, notes = dict(FAST), []
    if cpu_quick:  # compiling takes minutes on a cold CPU cache; bf16 crawls without bf16 units
        fast.update({"performance.compile": False, "performance.amp": FAITHFUL["performance.amp"]})
        notes.append("compile and bf16 skipped on CPU quick")
    return {
        "a_faithful": dict(common, setting="faithful", precision="fp32", performance=FAITHFUL,
                           micro_batches=size["faithful_micro"]),
        "a_fast": dict(common, setting="fast", precision="bf16", performance=fast, notes=notes,
                       micro_batches=size["fast_micro"]),
        "b_sr_spectra": {"width": size["width"], "repeats": size["repeats"]},
    }


def small_variants(cpu_quick: bool) -> tuple[list[str], dict]:
    from benchmarks.gpu.small_worker import VARIANTS

    variants = list(VARIANTS)
    skipped = {}
    if cpu_quick:  # these three compile nothing
        quick = ["eager", "eager-fused-adam", "step-graphs"]
        skipped.update({name: "skipped on CPU quick (compile takes minutes on a cold cache; TF32 and bf16 are GPU "
                              "arithmetic)" for name in variants if name not in quick})
        variants = quick
    return variants, skipped


def plans(args, on_gpu: bool) -> dict:
    size, cpu_quick = SIZES[args.quick], args.quick and not on_gpu
    if args.fast_micro:
        size = dict(size, fast_micro=args.fast_micro)
    variants, skipped = small_variants(cpu_quick)
    return dict(imagenet_plans(size, cpu_quick), **{
        "c_fid": {"width": size["width"], "n_images": args.fid_images or size["fid_images"],
                  "n_reference": size["fid_reference"], "batch_size": size["fid_batch"], "splits": size["splits"],
                  "inception_weights": args.inception_weights},
        "d_small_models": {"width": size["small_width"], "batch": size["small_batch"], "n_dis": 5,
                           "warmup": size["small_warmup"], "window_s": size["window_s"], "variants": variants,
                           "skipped": skipped, "concurrency": size["concurrency"],
                           "in_one_process": size["in_one_process"],
                           "data_count": size["study_images"],
                           "worker_cap_s": size["worker_cap_s"]},
        "e_biggan": {"width": size["width"], "batch": size["biggan_batch"], "warmup": size["warmup"],
                     "timed": size["timed"]},
        "f_loaders": {"images": size["loader_images"], "epochs": 1, "repeats": 1, "workers": size["loader_workers"]},
    })


def budgets(args) -> dict:
    chosen = dict(QUICK_BUDGETS_S if args.quick else BUDGETS_S)
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in chosen:
            raise SystemExit(f"--budget {item}: unknown section (one of {', '.join(chosen)})")
        chosen[name] = float(seconds)
    return chosen


def run_sections(names: list[str], section_plans: dict, section_budgets: dict, total_s: float,
                 directory: Path, after_each=lambda results: None) -> dict:
    """Each section in turn; its results are recorded in ``directory/<name>.json`` while it runs (what a call cut
    short still returns) and handed to ``after_each`` with the others' once it ended."""
    deadline = time.time() + total_s
    directory.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in names:
        budget, record = min(section_budgets[name], deadline - time.time()), directory / f"{name}.json"
        if budget < MINIMUM_S:
            results[name] = {"status": "skipped", "error": f"only {budget:.0f} s of the total budget left"}
        else:
            progress(name, f"start (budget {budget:.0f} s)")
            results[name] = (run_child(CHILD_OF[name], section_plans[name], record, budget) if name in CHILD_OF
                             else run_here(section_plans[name], record, budget))
            progress(name, f"{results[name]['status']} after {results[name]['wall_s']:.1f} s "
                           f"{results[name].get('error') or ''}")
        after_each(results)
        record.unlink(missing_ok=True)
    shutil.rmtree(directory, ignore_errors=True)
    return results


def report(args, here: dict, names, section_plans, section_budgets, results, wall, started: str) -> dict:
    """The results file's content; ``here``: ``environment()``'s record of the machine and code."""
    tests = gpu_tests(args.gpu_tests_log)
    if tests and "d_small_models" in results:  # with the numbers they vouch for, which a merge keeps together
        results = dict(results, d_small_models=dict(results["d_small_models"], gpu_tests=tests))
    return {
        "what": "GPU benchmark of the SRGANs toolkit (benchmarks/gpu/bench.py); README.md beside it explains it",
        "quick": args.quick,
        "complete": list(results) == names,  # false: written after a section, the ones after it not (yet) run
        "protocol": dict(here, command=" ".join(sys.argv), date=started,
                         sections_run=list(results), budgets_s=section_budgets, total_budget_s=args.total_budget,
                         total_wall_s=round(wall, 1), plans=section_plans, gpu_tests=tests,
                         timing="the device is synchronised before and after every timed region; medians of the "
                                "timed iterations after the warm-up ones; keys ending in _extrapolated are computed "
                                "from measured ones as their section states, never measured"),
        "sections": results,
        "ratios": derived_ratios(results),
    }


def write(result: dict, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{name}.json", json.dumps(result, indent=2, default=str) + "\n")
    write_markdown(result, out / f"{name}.md")
    progress("bench", f"wrote {out / name}.json and .md")


def micro_batches(text: str) -> list[int]:
    """--fast-micro's value: micro-batches the ImageNet recipe can run (ghost BN groups of 32, batch 2048)."""
    sizes = [int(item) for item in text.split(",") if item.strip().isdigit()]
    bn = SIZES[False]["bn"]
    if not sizes or len(sizes) != len(text.split(",")) or any(m % bn or GLOBAL_BATCH % m for m in sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated micro-batches, each a multiple of {bn} "
                                         f"that divides {GLOBAL_BATCH} (e.g. 512,256)")
    return sizes


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, every code path: about two minutes on a 2-core CPU")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    parser.add_argument("--sections", default=",".join(BUDGETS_S), help="comma-separated subset, in this order")
    parser.add_argument("--budget", action="append", default=[], metavar="SECTION=SECONDS")
    parser.add_argument("--total-budget", type=float, help="seconds for all sections (the sum of the sections' budgets; 540 with --quick)")
    parser.add_argument("--fid-images", type=int, help="N for (c); default 50000, 2 with --quick")
    parser.add_argument("--fast-micro", type=micro_batches, metavar="M,M,...",
                        help="(a)'s fast setting: micro-batches tried in order until one fits in memory (default "
                             "256,128,64): each a multiple of the BN group, 32, dividing the global batch, 2048")
    parser.add_argument("--inception-weights", default="auto",
                        help="auto (fid-helper if installed, else random weights: times only), fid-helper, random, "
                             "or a path to a torch-fidelity .pth or fid-helper's TorchScript default_1.pt")
    parser.add_argument("--gpu-tests-log", type=Path, help="run.sh --gpu-tests: their log, whose outcome the JSON "
                        "records (benchmarks/gpu/study_settings.py uses no setting that they did not pass)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def guarded(function, params: dict, partial: Partial) -> bool:
    """Run a section; an exception is recorded with its results (the benchmark carries on) and gives False."""
    try:
        function(params, partial)
    except Exception as error:
        traceback.print_exc()
        partial.record(error=f"{type(error).__name__}: {str(error).strip()[:500]}")
        return False
    return True


def run_here(params: dict, result: Path, budget: float) -> dict:
    """Section (d) in this process: its workers' deadlines keep it inside its budget."""
    from benchmarks.gpu import small

    started, partial = time.time(), Partial(result)
    ok = guarded(small.run, dict(params, deadline=started + budget), partial)
    return dict(partial.data, status="ok" if ok else "error", wall_s=round(time.time() - started, 2), budget_s=budget)


def child_main(args) -> int:
    """Run one section (or one small-model worker) and record its results, or its error, in --result."""
    return 0 if guarded(child_functions()[args.child], json.loads(args.params), Partial(Path(args.result))) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child:
        return child_main(args)
    started = time.time()
    args.total_budget = args.total_budget or TOTAL_BUDGET_S[args.quick]
    device = pick_device()
    names = [name for name in args.sections.split(",") if name]
    unknown = set(names) - set(BUDGETS_S)
    if unknown:
        raise SystemExit(f"--sections: unknown {sorted(unknown)} (choose from {', '.join(BUDGETS_S)})")
    section_plans, section_budgets = plans(args, device.type == "cuda"), budgets(args)
    if device.type == "cpu":  # several threads per process spin and crawl on a small shared CPU (SVDs: 100x)
        os.environ.update({name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    here = environment(device)
    progress("bench", f"{here['device']}, torch {here['torch']}, {describe(here['code'])}, sections {names}")
    stem = f"gpu_{slug(here['device'])}{'-quick' if args.quick else ''}"
    date = time.strftime("%Y-%m-%d %H:%M:%S")

    def save(results: dict) -> None:  # after every section: a call cut short keeps the sections it finished
        write(report(args, here, names, section_plans, section_budgets, results, time.time() - started, date),
              args.out, stem)

    if not run_sections(names, section_plans, section_budgets, args.total_budget, args.out / f"{stem}-running", save):
        save({})  # no section asked for: the protocol alone
    return 0


if __name__ == "__main__":
    sys.exit(main())
