"""The README's GPU speed table is made from the committed benchmark results, and says what was not measured."""
import copy
import json

import pytest

from benchmarks.gpu import summary
from benchmarks.gpu.small import agreement_limits, fastest_agreeing

H200 = summary.RESULTS / "gpu_nvidia-h200.json"


@pytest.fixture
def h200() -> dict:
    return json.loads(H200.read_text())


def cells(results: dict) -> dict[str, str]:
    """Row label -> the cell the table shows for ``results``."""
    rows = summary.table([results]).splitlines()[2:]
    return dict(row.strip("| ").split(" | ") for row in rows)


def test_the_readme_holds_the_table_that_the_committed_results_give():
    readme = summary.README.read_text()
    assert summary.with_table(readme, summary.table(summary.load_results())) == readme, \
        "README.md's speed table is stale: run python -m benchmarks.gpu.summary --write"


def test_a_cell_is_a_measured_number_or_says_why_not(h200):
    table = cells(h200)
    assert len(table) == len(summary.ROWS)
    assert table["ImageNet-128 SR recipe, faithful fp32: s per batch-2048 iteration"] == "7.06 s (extrapolated), MFU 49 %"
    assert table["the same, fast (bf16, channels_last, compile, ghost BN)"] == "0.78 s (extrapolated), MFU 30 %"
    assert table["fast over faithful (goal >= 1.5x at >= 35 % MFU)"] == "9.07x (extrapolated)"
    assert table["one dynamic SR call on D's convs, share of a faithful iteration"] == "1.1 % (17 convs, extrapolated)"
    assert table["SR at its interval, share of a fast iteration (goal <= 2 %)"] == \
        "2.0 % (every 5 iterations, extrapolated)"  # the interval and the count are the results file's
    # judged by the rounding yardstick the run measured (eager-fused-adam against eager)
    small = table["32 px study model (ch 32, batch 64, n_dis 5), one run: G-iterations/s (goal >= 200)"]
    assert "step-graphs 69.0 (agrees with eager as closely as eager-fused-adam does)" in small
    assert "bf16-step-graphs 88.4 (**differs from eager** (losses up to 0.59; by eager-fused-adam's spread))" in small
    unmeasured = copy.deepcopy(h200)  # a run without the yardstick: eager's own repeats in other processes
    unmeasured["sections"]["d_small_models"]["agreement_limits"]["yardstick"] = None
    del unmeasured["sections"]["d_small_models"]["warmup_losses_difference_to_eager"]["eager-fused-adam"]
    assert "no rounding yardstick measured" in cells(unmeasured)[
        "32 px study model (ch 32, batch 64, n_dis 5), one run: G-iterations/s (goal >= 200)"]

    earlier = copy.deepcopy(h200)  # a run whose fast setting ran out of time before accumulation 2
    fast = earlier["sections"]["a_fast"]
    del fast["seconds_per_2048_iteration_extrapolated"], fast["accumulation_2"]
    fast.update(status="timeout", error="killed at its budget of 170 s")
    earlier["ratios"]["imagenet128_fast_speedup_extrapolated"]["value"] = None
    del earlier["sections"]["c_fid"]
    table = cells(earlier)
    assert table["the same, fast (bf16, channels_last, compile, ghost BN)"] == "not measured (timeout); upper bound 0.81 s"
    # its upper bound (8 x its accumulation-1 iteration) bounds the speed-up
    sections = earlier["sections"]
    least = sections["a_faithful"]["seconds_per_2048_iteration_extrapolated"] / sections["a_fast"][
        "seconds_per_2048_iteration_upper_bound_extrapolated"]
    assert f"{least:.2f}" == "8.73"
    assert table["fast over faithful (goal >= 1.5x at >= 35 % MFU)"] == \
        "not measured; at least 8.73x (against fast's upper bound)"
    assert table["FID end to end (generation, TF-Inception, statistics): ours against torch-fidelity"] == "not run"
    other = copy.deepcopy(h200)  # a GPU without a datasheet peak here: its time, and MFU said to be unknown
    other["sections"]["a_fast"]["mfu"] = {"value": None, "why": "no datasheet peak for NVIDIA A100"}
    assert cells(other)["the same, fast (bf16, channels_last, compile, ghost BN)"] == \
        "0.78 s (extrapolated), MFU not known (no datasheet peak for this device)"


def test_agreement_is_judged_by_the_rounding_yardstick_the_run_recorded(h200):
    later = copy.deepcopy(h200)  # a run that measured eager-fused-adam: step graphs' 0.093 within 10x its spread
    small = later["sections"]["d_small_models"]
    small["warmup_losses_difference_to_eager"]["step-graphs"] = [2.3e-7, 1.1e-6, 2.1e-5, 6.2e-5, 6.7e-5, 2.2e-5,
                                                                 1.5e-3, 0.093]
    yardstick = [1e-7, 1e-6, 1e-5, 5e-5, 1e-4, 4e-3, 3e-2, 0.1]
    small["warmup_losses_difference_to_eager"]["eager-fused-adam"] = yardstick
    small["warmup_travel_difference_to_eager"]["eager-fused-adam"] = 0.02
    eager = {"warmup_losses": [{"loss_dis": 1.0}] * 8, "warmup_travel": {"gen": 1.0}}
    fused = {"warmup_losses": [{"loss_dis": 1.0 + d} for d in yardstick], "warmup_travel": {"gen": 1.02}}
    small["agreement_limits"] = agreement_limits({"eager": eager, "eager-fused-adam": fused})
    assert small["agreement_limits"]["losses"] == pytest.approx([1e-2] * 5 + [4e-2, 0.3, 1.0])
    assert small["agreement_limits"]["travel"] == pytest.approx(0.2)
    assert small["agreement_limits"]["yardstick"] == "eager-fused-adam"
    row = "32 px study model (ch 32, batch 64, n_dis 5), one run: G-iterations/s (goal >= 200)"
    assert "step-graphs 69.0 (agrees with eager as closely as eager-fused-adam does)" in cells(later)[row]
    small["warmup_losses_difference_to_eager"]["step-graphs"][2] = 0.02  # beyond 10x the yardstick's 1e-5 and 1e-2
    assert "(**differs from eager** (losses up to 0.093; by eager-fused-adam's spread))" in cells(later)[row]


def test_an_unmeasured_yardstick_is_not_named_and_a_nan_loss_never_agrees():
    """A yardstick skipped for budget leaves the plain 1e-2 limits, unnamed; a run whose second loss diverged (NaN)
    beside a first that matches differs from eager whatever the limits."""
    eager = {"warmup_losses": [{"loss_dis": 1.0, "loss_gen": 2.0}] * 3, "warmup_travel": {"gen": 1.0},
             "g_iterations_per_s": 10.0}
    limits = agreement_limits({"eager": eager, "eager-fused-adam": {"status": "skipped"}})
    assert limits == {"losses": [0.01] * 3, "travel": 0.01, "yardstick": None}
    diverged = dict(eager, warmup_losses=[{"loss_dis": 1.0, "loss_gen": float("nan")}] * 3, g_iterations_per_s=60.0)
    singles = {"eager": eager, "step-graphs": diverged}
    assert fastest_agreeing(singles, agreement_limits(singles)) == "eager"


def test_quick_runs_are_not_results(tmp_path, h200):
    (tmp_path / "gpu_nvidia-h200.json").write_text(json.dumps(h200))
    (tmp_path / "gpu_amd-epyc-x2-quick.json").write_text(json.dumps(dict(h200, quick=True)))
    assert [r["protocol"]["device"] for r in summary.load_results(tmp_path)] == ["NVIDIA H200"]


def test_strings_from_a_results_file_cannot_break_the_table_or_the_readme(h200):
    """A device name (or any string a results file carries) with '|', a line break or the table's end marker stays
    inside its cell: one line per row, the same number of cells, no marker that would cut the README."""
    hostile = copy.deepcopy(h200)
    hostile["protocol"]["device"] = f"GPU | x\n{summary.END}\n<script>"
    block = summary.table([hostile])
    lines = block.splitlines()
    assert len(lines) == len(summary.ROWS) + 2 and summary.END not in block and "<script>" not in block
    assert all(line.replace("\\|", "").count("|") == 3 for line in lines)
    readme = summary.with_table(f"a\n{summary.START}\nold\n{summary.END}\nb", block)
    assert readme.startswith("a\n") and readme.endswith(f"{summary.END}\nb")
