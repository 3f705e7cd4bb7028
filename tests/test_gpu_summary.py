"""The README's GPU speed table is made from the committed benchmark results, and says what was not measured."""
import copy
import json

import pytest

from benchmarks.gpu import summary

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
    assert table["ImageNet-128 SR recipe, faithful fp32: s per batch-2048 iteration"] == "7.06 s (extrapolated), MFU 0.49"
    assert table["the same, fast (bf16, channels_last, compile, ghost BN)"].startswith("not measured (timeout)")
    # fast's accumulation 2 was not reached: its upper bound (8 x its accumulation-1 iteration) bounds the speed-up
    sections = h200["sections"]
    least = sections["a_faithful"]["seconds_per_2048_iteration_extrapolated"] / sections["a_fast"][
        "seconds_per_2048_iteration_upper_bound_extrapolated"]
    assert f"{least:.2f}" == "8.78"
    assert table["fast over faithful (goal >= 1.5x at >= 35 % MFU)"] == \
        "not measured; at least 8.78x (against fast's upper bound)"
    assert table["one dynamic SR call (17 convs), share of a faithful iteration"] == "6.2 %"

    later = copy.deepcopy(h200)  # a later run that measured the fast setting and checked agreement
    fast = later["sections"]["a_fast"]
    fast.update(seconds_per_2048_iteration_extrapolated=2.5, mfu={"value": 0.41}, status="ok")
    later["ratios"]["imagenet128_fast_speedup_extrapolated"]["value"] = 7.06 / 2.5
    small = later["sections"]["d_small_models"]
    small["warmup_losses_difference_to_eager"] = {"eager": [0.0], "fp32-graphs": [0.5]}
    small["warmup_travel_difference_to_eager"] = {"eager": 0.0, "fp32-graphs": 1e-3}
    del later["sections"]["c_fid"]
    table = cells(later)
    assert table["the same, fast (bf16, channels_last, compile, ghost BN)"] == "2.50 s (extrapolated), MFU 0.41"
    assert table["fast over faithful (goal >= 1.5x at >= 35 % MFU)"] == "2.82x"
    assert "fp32-graphs 39.3 (**differs from eager** (losses up to 0.5))" in table[
        "32 px study model (ch 32, batch 64, n_dis 5), one run: G-iterations/s"]
    assert table["FID of 50k images end to end: ours against torch-fidelity"] == "not run"


def test_quick_runs_are_not_results(tmp_path, h200):
    (tmp_path / "gpu_nvidia-h200.json").write_text(json.dumps(h200))
    (tmp_path / "gpu_amd-epyc-x2-quick.json").write_text(json.dumps(dict(h200, quick=True)))
    assert [r["protocol"]["device"] for r in summary.load_results(tmp_path)] == ["NVIDIA H200"]
