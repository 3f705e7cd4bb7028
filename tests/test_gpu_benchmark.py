"""benchmarks/gpu/bench.py --quick on the CPU: every section measured or null with its reason, ratios from the numbers.

One run (about 40 s on a quiet 2-core machine) feeds all the tests; the full Inception weights file of conftest.py
makes section (c) take the path of a user's torch-fidelity weights, Inception Score included.
"""
import json
import os
import statistics
import subprocess
import sys
from math import prod
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"a_faithful", "a_fast", "b_sr_spectra", "c_fid", "d_small_models", "e_biggan", "f_loaders"}


@pytest.fixture(scope="module")
def bench(tmp_path_factory, full_inception_weights):
    out = tmp_path_factory.mktemp("gpu-bench")
    command = [sys.executable, str(ROOT / "benchmarks/gpu/bench.py"), "--quick", "--out", str(out),
               "--inception-weights", str(full_inception_weights)]
    subprocess.run(command, cwd=ROOT, check=True, timeout=560)
    (path,) = out.glob("gpu_*-quick.json")
    return json.loads(path.read_text()), path


def nulls_without_reason(value, where: str = "") -> list[str]:
    """Dotted keys whose value is null without a sibling '<key>_why'."""
    if isinstance(value, list):
        return [miss for index, item in enumerate(value) for miss in nulls_without_reason(item, f"{where}[{index}]")]
    if not isinstance(value, dict):
        return []
    missing = [f"{where}.{key}" for key, item in value.items() if item is None and f"{key}_why" not in value]
    return missing + [miss for key, item in value.items() for miss in nulls_without_reason(item, f"{where}.{key}")]


def lookup(sections: dict, path: str):
    for key in path.split("."):
        sections = sections[key]
    return sections


def test_every_section_ran_and_every_null_says_why(bench):
    result, path = bench
    assert result["complete"] and not list(path.parent.glob("*-running"))  # the sections' own records folded in
    assert set(result["sections"]) == SECTIONS
    assert {name: section["status"] for name, section in result["sections"].items()} == dict.fromkeys(SECTIONS, "ok")
    assert nulls_without_reason(result["sections"]) == []
    assert nulls_without_reason(result["ratios"]) == []


def test_each_section_measured_its_numbers(bench):
    sections = bench[0]["sections"]
    for name in ("a_faithful", "a_fast"):
        assert sections[name]["seconds_per_2048_iteration_extrapolated"] > 0
        assert sections[name]["flops_per_2048_iteration"] > 0
    assert sections["a_fast"]["bn_batchsize"] < sections["a_fast"]["micro_batchsize"]  # ghost BN
    for name in ("a_faithful", "a_fast"):  # 2 iterations at accumulation 2, profiled: on a CPU, the ops by self time
        profile = sections[name]["kernel_profile"]
        assert profile["iterations"] == 2 and profile["wall_ms_per_g_iteration"] > 0
        assert any("conv" in entry["name"] for entry in profile["top"])
    assert sections["b_sr_spectra"]["convs"] == 17 and sections["b_sr_spectra"]["sr_dynamic_edit_s"] > 0
    assert set(sections["b_sr_spectra"]["sr_edit_math_s"]) == {"gram", "svd"}  # the edit's two solvers side by side
    assert all(seconds > 0 for seconds in sections["b_sr_spectra"]["sr_edit_math_s"].values())
    ours, theirs = sections["c_fid"]["ours"], sections["c_fid"]["torch_fidelity"]
    assert ours["total_s"] > 0 and theirs["total_s"] > 0
    assert ours["fid"] == pytest.approx(theirs["fid"], rel=1e-4)  # same images, same network
    assert ours["inception_score"] == pytest.approx(theirs["inception_score"], rel=1e-3)
    small = sections["d_small_models"]
    assert small["single"]["eager"]["g_iterations_per_s"] > 0
    assert small["arithmetic"]["precision"] == "fp32" and small["arithmetic"]["flops_per_g_iteration"] > 0
    assert small["single"]["eager"]["cudagraph_skips"] == 0 and len(small["single"]["eager"]["warmup_losses"]) == 5
    # on a CPU step-graphs runs its static buffers without capture: eager's arithmetic, with fused Adam's rounding
    differences = small["warmup_losses_difference_to_eager"]
    assert differences["eager"] == [0.0] * 5 and max(differences["step-graphs"]) < 1e-4
    # the yardstick, eager with fused Adam, rounds otherwise: the limits are AGREEMENT or 10x its spread, recorded
    assert 0 < max(differences["eager-fused-adam"]) < 1e-4
    limits = small["agreement_limits"]
    assert limits["yardstick"] == "eager-fused-adam" and len(limits["losses"]) == 5
    assert limits["losses"] == [max(1e-2, 10 * d) for d in differences["eager-fused-adam"]]
    assert small["concurrent_variant"] in ("eager", "eager-fused-adam", "step-graphs")
    assert set(small["skipped"]) == {"compiled-step-graphs", "fp32-graphs", "tf32-step-graphs", "bf16-step-graphs",
                                     "fast-step-graphs", "fast", "fast-reduce-overhead"}
    sr = small["single"]["eager"]["sr_call_s"]  # one SR call on the study's D, per mode, on the device and the CPU
    assert all(sr[f"{mode}_{where}"] > 0 for mode in ("static", "rescale", "dynamic") for where in ("device", "cpu"))
    assert "sr_call_s" not in small["single"]["step-graphs"]
    for variant in ("eager", "step-graphs"):  # where an iteration's time goes: on a CPU, the ops by self time
        profile = small["single"][variant]["kernel_profile"]
        assert profile["wall_ms_per_g_iteration"] > 0 and profile["top_is"] == "CPU ops by self time"
        assert any("conv" in entry["name"] and entry["ms"] > 0 and entry["calls"] > 0 for entry in profile["top"])
    travel = small["single"]["step-graphs"]["warmup_travel"]
    assert travel["gen"] > 0 and travel["dis"] > 0  # both networks learned in the warm-up
    assert small["warmup_travel_difference_to_eager"]["eager"] == 0.0
    assert small["warmup_travel_difference_to_eager"]["step-graphs"] < 1e-3
    assert small["single"]["step-graphs"]["g_iterations_per_s"] > 0
    two = small["concurrent"]["2"]
    assert len(two["g_iterations_per_s_each"]) == 2
    assert two["warmup_losses_difference_to_single"] == [[0.0] * 5] * 2  # every process starts from the same models
    assert two["g_iterations_per_s_total"] == sum(two["g_iterations_per_s_each"])
    shared = small["in_one_process"]["2"]  # two runs taking turns in one process (on a GPU: one stream each)
    assert shared["status"] == "ok" and shared["runs_in_process"] == 2 and shared["variant"] == small["concurrent_variant"]
    assert shared["warmup_losses_difference_to_single"] == [0.0] * 5  # its first run: the single run's seed
    assert shared["seeds"] == [0, 1]  # the other on another: equal runs would write equal values, races unseen
    assert shared["g_iterations_per_s_total"] == pytest.approx(2 * shared["g_iterations_per_s"])
    # the study's variant again on Fashion-MNIST files: held on the device as the study does, and through the loader
    on_device, loader = small["study_data_path"], small["loader_data_path"]
    assert on_device["data_on_device"] and not loader["data_on_device"]
    assert "performance.data_on_device=true" in on_device["config_overrides"]
    for data in (on_device, loader):
        assert data["variant"] == small["concurrent_variant"] and data["status"] == "ok" and data["images"] == 256
        assert data["rate_to_resident_data"] == pytest.approx(
            data["g_iterations_per_s"] / small["single"][data["variant"]]["g_iterations_per_s"])
        assert data["warmup_losses"] != small["single"][data["variant"]]["warmup_losses"]  # other images
    # the same batches but for the dequantization noise (below a grey level): close, not equal, losses
    np.testing.assert_allclose([list(d.values()) for d in on_device["warmup_losses"]],
                               [list(d.values()) for d in loader["warmup_losses"]], rtol=0.05, atol=0.05)
    assert on_device["warmup_losses"] != loader["warmup_losses"]
    loaders = sections["f_loaders"]
    assert loaders["workers"] == 2 and all(loaders[kind][name] > 0 for kind in ("jpeg", "prepared") for name in
                                           ("on", "off"))
    biggan = sections["e_biggan"]
    for setting in ("faithful", "bf16"):
        assert biggan[setting]["iteration_s"] == statistics.median(biggan[setting]["iterations_s"]) > 0
        assert biggan[setting]["kernel_profile"]["iterations"] == 1  # where its time goes, after the timing
        assert biggan[setting]["kernel_profile"]["wall_ms_per_g_iteration"] > 0


def test_a_g_iteration_counts_every_d_step_forward_and_backward(bench):
    """The arithmetic that (d)'s rates are measured against: at least n_dis D steps of forward and backward (about
    3 forwards) over reals and fakes, and the G step's forwards on top."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.gpu.small_worker import CONFIG, small_overrides
    from source.config import load_config
    from source.training import build

    result, _ = bench
    params = result["protocol"]["plans"]["d_small_models"]
    config = load_config(CONFIG, small_overrides(dict(params, variant="eager")))
    models = build.build_models(config, torch.device("cpu"))
    images = torch.zeros(2 * config.batchsize, 1, 32, 32)
    with FlopCounterMode(display=False) as d_forward, torch.no_grad():
        models.dis(images, None)
    with FlopCounterMode(display=False) as g_forward, torch.no_grad():
        models.gen(torch.zeros(config.gen_batch, models.gen.dim_z), None)
    counted = result["sections"]["d_small_models"]["arithmetic"]["flops_per_g_iteration"]
    floor = config.updater.n_dis * 3 * d_forward.get_total_flops() + g_forward.get_total_flops()
    assert floor < counted < 2 * floor


def test_extrapolation_and_ratios_are_computed_from_the_measured_numbers(bench):
    result, _ = bench
    sections = result["sections"]
    for name in ("a_faithful", "a_fast"):
        section = sections[name]
        one, two = (section[f"accumulation_{k}"]["median_s"] for k in (1, 2))
        assert one == statistics.median(section["accumulation_1"]["timed_s"])
        steps = 2048 // section["micro_batchsize"]
        assert section["seconds_per_2048_iteration_extrapolated"] == pytest.approx(one + (steps - 1) * (two - one))
    speedup = result["ratios"]["imagenet128_fast_speedup_extrapolated"]["value"]
    assert speedup == pytest.approx(sections["a_faithful"]["seconds_per_2048_iteration_extrapolated"]
                                    / sections["a_fast"]["seconds_per_2048_iteration_extrapolated"])
    for name, ratio in result["ratios"].items():
        if ratio["value"] is not None:
            denominator = prod(lookup(sections, path) for path in ratio["denominators"])
            assert ratio["value"] == pytest.approx(lookup(sections, ratio["numerator"]) / denominator), name


def test_markdown_report_shows_the_sections_and_ratios(bench):
    result, path = bench
    markdown = path.with_suffix(".md").read_text()
    for heading in ("## (a)", "## (b)", "## (c)", "## (d)", "## (e) CIFAR-10-LT BigGAN", "## Ratios", "## (f) Loaders with 2 workers"):
        assert heading in markdown
    assert "the study's data path" in markdown and "GFLOP of the models' arithmetic" in markdown
    assert "Where a G-iteration's time goes" in markdown and "- eager: " in markdown and "- step-graphs: " in markdown
    assert f"{result['ratios']['imagenet128_fast_speedup_extrapolated']['value']:.3g}" in markdown


def test_a_later_run_of_some_sections_merges_into_the_earlier_results(bench, tmp_path):
    from benchmarks.gpu.merge import main as merge_main

    result, path = bench
    earlier, later = tmp_path / "gpu_x.json", tmp_path / "later.json"
    earlier.write_text(json.dumps(result))
    small = json.loads(json.dumps(result["sections"]["d_small_models"]))
    small["single"]["eager"]["g_iterations_per_s"] /= 2  # the later run measured eager at half the rate
    tests = {"exit": 0, "summary": "8 passed in 41.20s", "passed": True}
    protocol = dict(result["protocol"], date="2099-01-01 00:00:00", sections_run=["d_small_models"], gpu_tests=tests)
    later.write_text(json.dumps(dict(result, protocol=protocol, sections={"d_small_models": small})))
    assert merge_main([str(earlier), str(later)]) == 0
    merged = json.loads(earlier.read_text())
    assert merged["sections"]["d_small_models"] == small and merged["sections"]["a_fast"] == result["sections"]["a_fast"]
    assert merged["protocol"]["section_dates"]["d_small_models"] == "2099-01-01 00:00:00"
    assert merged["protocol"]["section_dates"]["a_fast"] == result["protocol"]["date"]
    ratio = merged["ratios"]["small_step_graphs_over_eager"]["value"]
    assert ratio == pytest.approx(small["single"]["step-graphs"]["g_iterations_per_s"]
                                  / small["single"]["eager"]["g_iterations_per_s"])
    assert "each section's date" in earlier.with_suffix(".md").read_text()
    assert merged["protocol"]["gpu_tests"] == tests and "complete" not in merged  # each run's: in its summary
    assert [run["complete"] for run in merged["protocol"]["runs"]] == [True, True]
    assert merge_main([str(earlier), str(later)]) == 2  # a run is merged once
    failed = dict(result["sections"]["a_fast"], status="timeout")
    later.write_text(json.dumps(dict(result, protocol=dict(protocol, date="2099-01-02 00:00:00", gpu_tests=None),
                                     sections={"a_fast": failed})))
    assert merge_main([str(earlier), str(later)]) == 0
    merged = json.loads(earlier.read_text())
    assert merged["sections"]["a_fast"]["status"] == "ok"  # the clean one stays
    assert merged["protocol"]["gpu_tests"] == tests  # a run without the tests keeps the last outcome
    later.write_text(json.dumps(dict(result, protocol=dict(protocol, device="another GPU", date="2099-01-03"))))
    assert merge_main([str(earlier), str(later)]) == 2  # numbers of another device are not merged
    kept = earlier.read_bytes(), earlier.with_suffix(".md").read_bytes()
    later.write_text(json.dumps(dict(result, protocol=dict(protocol, date="2099-01-04", code={"commit": 5}))))
    assert merge_main([str(earlier), str(later)]) == 2  # a report it cannot render: neither file is rewritten
    assert (earlier.read_bytes(), earlier.with_suffix(".md").read_bytes()) == kept


def test_run_sh_runs_the_gpu_only_tests_then_the_benchmark(tmp_path):
    """The device call's one command: on a CPU the GPU-only tests skip (on a GPU they run), then bench.py writes,
    and leaves results that hold section (d) on the machine too, for the next call while it is warm
    (measure_then_study.sh 0); others it leaves alone."""
    measured_here = tmp_path.parent / f"{tmp_path.name}-measured"
    with_d = tmp_path / "gpu_earlier.json"  # as an earlier run of this call would have left it
    with_d.write_text(json.dumps({"sections": {"d_small_models": {"status": "ok"}}}))
    completed = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh"), "--gpu-tests", "--quick", "--sections",
                                ""], cwd=ROOT, env={**os.environ, "OUT": str(tmp_path),
                                                    "MEASURED_HERE": str(measured_here)},
                               capture_output=True, text=True, timeout=300)  # the sections: the fixture's run
    assert completed.returncode == 0, completed.stdout[-2000:]
    tests_log = (tmp_path / "gpu_tests.log").read_text()
    expected = "9 passed" if torch.cuda.is_available() else "9 skipped"
    assert expected in tests_log, tests_log[-500:]
    (result,) = tmp_path.glob("gpu_*-quick.json")
    assert [path.name for path in measured_here.iterdir()] == [with_d.name]  # this run's (no (d)) stays in $OUT
    result = json.loads(result.read_text())
    assert result["complete"] and result["sections"] == {} and (tmp_path / "gpu_bench.log").is_file()
    tests = result["protocol"]["gpu_tests"]  # what study_settings.py requires before it uses what they test
    assert tests["exit"] == 0 and tests["summary"].startswith(expected) and tests["passed"] == torch.cuda.is_available()


@pytest.mark.parametrize("log, expected", [
    ("....\n8 passed in 41.20s\npytest exit 0\n", (0, "8 passed in 41.20s", True)),
    ("..F.\n=== 1 failed, 7 passed in 40.00s ===\npytest exit 1\n", (1, "1 failed, 7 passed in 40.00s", False)),
    ("ssss\n8 skipped in 3.00s\npytest exit 0\n", (0, "8 skipped in 3.00s", False)),
    ("..\nFatal Python error: Aborted\npytest exit 134\n", (134, None, False)),  # a crash: no summary
    ("....\n", (None, None, False)),  # killed before it could say how it ended
])
def test_the_gpu_only_tests_outcome_is_read_from_their_log(tmp_path, log, expected):
    from benchmarks.gpu.common import gpu_tests

    (tmp_path / "tests.log").write_text(log)
    outcome = gpu_tests(tmp_path / "tests.log")
    assert (outcome["exit"], outcome["summary"], outcome["passed"]) == expected
    assert gpu_tests(None) is None


def test_the_report_is_rewritten_after_every_section_and_d_carries_the_gpu_tests(tmp_path, monkeypatch):
    """A call cut short returns the sections it finished, and the running one's record so far."""
    from benchmarks.gpu import bench

    seen = []

    def fake_child(name, params, result, budget):
        result.write_text(json.dumps({"so_far": name}))
        report = (json.loads(next(tmp_path.glob("gpu_*-quick.json")).read_text()),
                  next(tmp_path.glob("gpu_*-quick.md")).read_text()) if seen else None
        seen.append((name, report, result.relative_to(tmp_path).parts))
        return {"status": "ok", "wall_s": 0.1, "measured": name}

    monkeypatch.setattr(bench, "run_child", fake_child)
    monkeypatch.setattr(bench, "run_here", lambda params, result, budget: fake_child("d", params, result, budget))
    log = tmp_path / "tests.log"
    log.write_text("........\n8 passed in 41.20s\npytest exit 0\n")
    assert bench.main(["--quick", "--out", str(tmp_path), "--sections", "b_sr_spectra,d_small_models",
                       "--gpu-tests-log", str(log)]) == 0
    (first, _, running), (second, (report, markdown), _) = seen
    assert (first, second) == ("b", "d") and running[1] == "b_sr_spectra.json"  # in $OUT: a call cut short returns it
    assert running[0].startswith("gpu_") and running[0].endswith("-quick-running")
    assert report["complete"] is False and list(report["sections"]) == ["b_sr_spectra"]
    assert "**Incomplete**: written after b_sr_spectra" in markdown
    final = json.loads(next(tmp_path.glob("gpu_*-quick.json")).read_text())
    assert final["complete"] and final["sections"]["d_small_models"]["measured"] == "d"
    assert not list(tmp_path.glob("*-running"))
    # the tests' outcome travels with (d), the numbers that study_settings.py takes on their word, through merges
    assert final["sections"]["d_small_models"]["gpu_tests"]["passed"] and final["protocol"]["gpu_tests"]["passed"]
    assert "gpu_tests" not in final["sections"]["b_sr_spectra"]


def test_merging_a_file_that_is_not_such_results_is_a_one_line_error(tmp_path, capsys):
    from benchmarks.gpu.merge import main as merge_main
    broken, foreign = tmp_path / "broken.json", tmp_path / "foreign.json"
    broken.write_text("{")
    foreign.write_text('{"protocol": []}')
    for earlier, later, expected in ((broken, foreign, "broken.json is not JSON"),
                                     (foreign, foreign, "not this benchmark's results (AttributeError")):
        assert merge_main([str(earlier), str(later)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("merge: ") and expected in err and err.count("\n") == 1, err
    assert broken.read_text() == "{" and not foreign.with_suffix(".md").exists()


def test_the_fast_settings_micro_batches_can_be_chosen_and_bad_ones_are_one_line_errors(capsys):
    """--fast-micro 512,256: (a)'s fast setting tries 512 first (more work per kernel, for the MFU goal)."""
    from benchmarks.gpu import bench as script

    plans = script.plans(script.parse(["--fast-micro", "512,256"]), on_gpu=True)
    assert plans["a_fast"]["micro_batches"] == [512, 256] and plans["a_faithful"]["micro_batches"] == [32]
    assert script.plans(script.parse([]), on_gpu=True)["a_fast"]["micro_batches"] == [256, 128, 64]
    for bad in ("500", "256,x", "4096", ""):
        with pytest.raises(SystemExit):
            script.parse(["--fast-micro", bad])
        assert "multiple of 32 that divides 2048" in capsys.readouterr().err


def test_the_kernel_alternatives_compute_what_the_models_kernels_compute(tmp_path):
    """benchmarks/gpu/kernels.py (--quick: the CPU's code path; on a GPU, graphs): pooling, up-sampling and SN's power
    steps in their candidate forms give the models' values, so that only their times differ."""
    from benchmarks.gpu import kernels

    assert kernels.main(["--quick", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("kernels_*-quick.json")
    result = json.loads(path.read_text())
    for row in result["avg_pool_2x2"] + result["nearest_upsample_x2"]:
        assert row["output_max_difference"] <= 1e-6 and row["gradient_max_difference"] <= 1e-6
        assert row["native_us"] > 0 and row["candidate_us"] > 0
    assert result["nearest_upsample_x2"][0]["output_max_difference"] == 0  # a copy: bit for bit
    steps = result["sn_power_steps_study_dis"]
    assert steps["layers"] == 11 and 1 < steps["shapes"] < 11 and steps["max_difference"] <= 1e-5
    (stacked,) = result["stacked_runs_conv3x3"]  # one grouped conv computes the K runs' separate convs
    assert stacked["runs"] == 2 and stacked["max_relative_difference"] <= 1e-6 and stacked["grouped_us"] > 0
    assert stacked["grouped_channels_last_us"] > 0  # its values are in max_relative_difference too


def test_a_kernel_case_that_fails_on_the_device_keeps_the_others_numbers(tmp_path, monkeypatch):
    """A shape that fails records its error among the others' rows, a case that fails among the other cases, and
    every finished case is on disk before the next starts (a device call cut short returns them)."""
    from benchmarks.gpu import kernels

    def refused(*_):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    path = tmp_path / f"kernels_{kernels.slug(kernels.device_name(kernels.pick_device()))}-quick.json"

    def out_of_memory(*_):
        assert set(json.loads(path.read_text())) >= {"avg_pool_2x2", "nearest_upsample_x2"}  # saved already
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(kernels, "stacked_conv", refused)
    monkeypatch.setitem(kernels.CASES, "sn_power_steps_study_dis", out_of_memory)
    pooling = kernels.POOL_SHAPES[True]
    monkeypatch.setitem(kernels.POOL_SHAPES, True, [(4, 2, 8, 7), *pooling])  # an odd width: the view refuses it
    assert kernels.main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads(path.read_text())
    assert result["stacked_runs_conv3x3"] == [{"error": "RuntimeError: operation not permitted when stream is capturing"}]
    assert result["sn_power_steps_study_dis"] == {"error": "OutOfMemoryError: CUDA out of memory"}
    odd, *others = result["avg_pool_2x2"]
    assert odd["error"].startswith("RuntimeError") and [row["shape"] for row in others] == [list(pooling[0])]


def test_on_a_gpu_each_kernel_case_runs_in_a_process_of_its_own(monkeypatch):
    """What a GPU does (isolate: a failed capture must not spoil the later cases), here on the CPU: one case's rows
    come back from a spawned process as from this one."""
    from benchmarks.gpu import kernels

    monkeypatch.setattr(kernels, "CASES", {"avg_pool_2x2": kernels.pooling})
    own = list(kernels.POOL_SHAPES[True][0])
    monkeypatch.setitem(kernels.POOL_SHAPES, True, [(2, 2, 4, 4)])  # this process's only: the spawned one reads its own
    saved = []
    result = kernels.run(True, torch.device("cpu"), saved.append, isolate=True)
    (row,) = result["avg_pool_2x2"]
    assert row["shape"] == own and row["gradient_max_difference"] <= 1e-6
    assert saved == [result]
    (row,) = kernels.run(True, torch.device("cpu"), saved.append, isolate=False)["avg_pool_2x2"]
    assert row["shape"] == [2, 2, 4, 4]


def test_section_c_runs_with_the_weights_make_setup_installs(tmp_path):
    """The documented command, without --inception-weights: fid-helper's pool3 copy (its logits are NaN, which our
    loader refuses: section c failed on every machine `make setup` made), else random weights."""
    command = [sys.executable, str(ROOT / "benchmarks/gpu/bench.py"), "--quick", "--out", str(tmp_path),
               "--sections", "c_fid"]
    subprocess.run(command, cwd=ROOT, check=True, timeout=300)
    (path,) = tmp_path.glob("gpu_*-quick.json")
    section = json.loads(path.read_text())["sections"]["c_fid"]
    assert section["status"] == "ok" and section["fid_abs_difference"] < 1e-2  # both pipelines agree
    if section["weights"].startswith("fid-helper"):
        assert not section["with_logits"]
        for pipeline in ("ours", "torch_fidelity"):
            assert section[pipeline]["inception_score"] is None and "no logits" in section[pipeline]["inception_score_why"]


def test_run_sh_quick_without_out_leaves_the_committed_results_alone():
    """A CPU's quick check wrote gpu_<cpu>-quick.json into benchmarks/results, to be committed or carried by mistake."""
    before = sorted(path.name for path in (ROOT / "benchmarks" / "results").iterdir())
    env = {key: value for key, value in os.environ.items() if key != "OUT"}
    completed = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh"), "--quick", "--sections", ""], cwd=ROOT,
                               env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-2000:]
    assert "the results go to /tmp/srgan-gpu-bench-quick" in completed.stdout
    assert sorted(path.name for path in (ROOT / "benchmarks" / "results").iterdir()) == before


def test_a_stack_of_runs_computes_each_runs_function(one_thread):
    """benchmarks/gpu/stacked.py: K models (3: an odd number, whose layout a transposition would break) as one
    stack give each model's outputs, spectral norm vectors and gradients, and the stack's G-iterations each run's.
    In float64: in float32 a ReLU input within rounding of 0 (1e-8, seen here) can flip and change a gradient
    visibly, which says nothing of the stack."""
    from benchmarks.gpu.stacked import RECIPE, Pair, g_iteration, study_models
    from benchmarks.gpu.stacking import StackedConv2d, StackedLinear, stack
    from source.links.conditional_batchnorm import BatchNorm2d
    from source.spectral.spectra import raw_weight, spectral_norm_of

    runs = 3
    models = [(gen.double(), dis.double()) for gen, dis in study_models(runs, quick=True, device=torch.device("cpu"))]
    gens, dises = [gen for gen, _ in models], [dis for _, dis in models]
    with torch.no_grad():  # SN's vectors far from converged: a power step moves them visibly
        for norm in (spectral_norm_of(layer) for dis in dises for layer in dis.modules()):
            if norm is not None:
                for vector in (norm._u, norm._v):
                    vector.copy_(torch.nn.functional.normalize(torch.randn_like(vector), dim=0))
        for model in gens + dises:  # each run's biases and BatchNorm state its own (they start alike: 0 and 1)
            for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
                if name.endswith(("bias", "running_mean")):
                    tensor.add_(0.1 * torch.randn_like(tensor))
                elif name.endswith(("bn.weight", "b1.weight", "b2.weight", "b5.weight", "running_var")):
                    tensor.mul_(1 + 0.1 * torch.rand_like(tensor))
    gen_stack, dis_stack = stack(gens), stack(dises)
    z = torch.randn(8, runs, gens[0].dim_z, dtype=torch.float64)
    images = torch.rand(8, runs, 1, 32, 32, dtype=torch.float64) * 2 - 1
    fakes = gen_stack(z.flatten(1, 2)).view(8, runs, 1, 32, 32)
    scores = dis_stack(images.flatten(1, 2))
    # train mode: BatchNorm's batch statistics, SN's power step; one forward each, as the stack's
    expected_fakes, expected_scores = ([model(inputs[:, k]) for k, model in enumerate(models)]
                                       for models, inputs in ((gens, z), (dises, images)))
    for k in range(runs):
        torch.testing.assert_close(fakes[:, k], expected_fakes[k], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(scores[:, k], expected_scores[k], atol=1e-10, rtol=1e-10)
    (fakes.square().sum() + scores.sum()).backward()
    sum(fake.square().sum() + score.sum() for fake, score in zip(expected_fakes, expected_scores)).backward()
    compared = {StackedConv2d: 0, StackedLinear: 0, BatchNorm2d: 0}
    for stacked, originals in ((gen_stack, gens), (dis_stack, dises)):
        for name, layer in stacked.named_modules():
            if type(layer) not in compared:
                continue
            compared[type(layer)] += 1
            peers = [model.get_submodule(name) for model in originals]
            norms = [spectral_norm_of(peer) for peer in peers]
            weights = [raw_weight(peer) if norms[0] else peer.weight for peer in peers]
            for mine, theirs in ((layer.weight, weights), (layer.bias, [peer.bias for peer in peers])):
                if mine is not None:
                    torch.testing.assert_close(mine.grad.view(runs, *theirs[0].shape),
                                               torch.stack([t.grad for t in theirs]), atol=1e-10, rtol=1e-10)
            if norms[0]:  # the power step advanced each run's vectors as the run's own did
                torch.testing.assert_close(layer.sn.u, torch.stack([norm._u for norm in norms]), atol=1e-12, rtol=0)
                torch.testing.assert_close(layer.sn.v, torch.stack([norm._v for norm in norms]), atol=1e-12, rtol=0)
            if isinstance(layer, BatchNorm2d):  # running statistics per run
                for statistic in ("running_mean", "running_var"):
                    torch.testing.assert_close(getattr(layer, statistic).view(runs, -1),
                                               torch.stack([getattr(peer, statistic) for peer in peers]),
                                               atol=1e-12, rtol=1e-10)
    assert all(compared.values()), compared

    recipe = RECIPE[True]
    real = torch.rand(8, runs, 1, 32, 32, dtype=torch.float64) * 2 - 1
    separate = [Pair(gen, dis, lambda t, k=k: t[:, k], recipe) for k, (gen, dis) in enumerate(models)]
    stacked = [Pair(gen_stack, dis_stack, lambda t: t.flatten(1, 2), recipe)]
    for iteration in range(2):  # Adam's state per element: each run's update its own
        torch.manual_seed(iteration)
        expected = g_iteration(separate, real, gens[0].dim_z, runs)
        torch.manual_seed(iteration)
        torch.testing.assert_close(g_iteration(stacked, real, gens[0].dim_z, runs), expected, atol=1e-10, rtol=1e-10)


def test_only_the_layers_with_a_stacked_form_are_stacked():
    from benchmarks.gpu.stacking import stack
    from source.models import build_model

    conditional = [build_model("SNResNetProjectionDiscriminator", {"ch": 4, "n_classes": 3, "resolution": 32})
                   for _ in range(2)]
    with pytest.raises(ValueError, match=r"stack: l_y \(ParametrizedEmbedding\) has no stacked form"):
        stack(conditional)


def test_the_stacked_runs_benchmark_writes_both_rates(tmp_path, one_thread):
    from benchmarks.gpu import stacked

    assert stacked.main(["--quick", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("stacked_*-quick.json")
    (row,) = json.loads(path.read_text())["by_runs"]
    assert row["runs"] == 2 and row["separate_ms"] > 0 and row["stacked_ms"] > 0
    assert row["stacked_speedup"] == pytest.approx(row["separate_ms"] / row["stacked_ms"], rel=1e-2)
    assert len(row["warmup_losses_difference"]) == stacked.WARMUP and max(row["warmup_losses_difference"]) < 1e-4


def test_where_a_capture_fails_the_stacked_runs_are_timed_eagerly(monkeypatch, one_thread):
    """On a GPU each attempt runs in a process of its own (a failed capture leaves torch's CUDA state unusable):
    here the same steps in this process, then the isolated call's round trip."""
    from benchmarks.gpu import stacked

    eager, timing = stacked.prepared, {"rounds": 2, "run_iterations_per_round": 1}

    def capture_refused(*args):
        if args[-1]:
            try:
                raise ValueError("the cause")
            except ValueError:
                raise RuntimeError("operation not permitted when stream is capturing\nmore")
        return eager(*args)

    monkeypatch.setattr(stacked, "prepared", capture_refused)
    row = stacked.measured(2, True, torch.device("cpu"), timing, graph=True, isolate=False)
    assert row["graph_error"] == ("RuntimeError: operation not permitted when stream is capturing (after ValueError: "
                                  "the cause)")
    assert row["timing"] == "eager" and row["stacked_ms"] > 0 and max(row["warmup_losses_difference"]) < 1e-4
    assert len(row["rounds_ms"]) == 2 and row["stacked_ms"] == pytest.approx(
        statistics.median(stacked_ms for _, stacked_ms in row["rounds_ms"]), abs=1e-3)
    isolated = stacked.measured(2, True, torch.device("cpu"), timing, graph=False, isolate=True)
    assert isolated["timing"] == "eager" and isolated["stacked_g_iterations_per_s_total"] > 0
    assert isolated["warmup_losses_difference"] == row["warmup_losses_difference"]  # the same seeds and arithmetic
