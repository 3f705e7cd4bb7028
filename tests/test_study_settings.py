"""benchmarks/gpu/study_settings.py and measure_then_study.sh: a study chunk takes what the benchmark measured best."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks.gpu.study_settings import FUSED_ADAM, STEP_GRAPHS, choose
from source.study import state
from source.study.spec import load_study
from test_study import write_study

ROOT = Path(__file__).resolve().parents[1]
AGREES = [0.0, 1e-4, 0.0, 2e-3, 0.0]


def section(variant="step-graphs", in_process=None, processes=None, sr=None) -> dict:
    """Section (d) as the benchmark records it, with the rates given (G-iterations/s)."""
    return {"single": {"eager": {"g_iterations_per_s": 13.1, "sr_call_s": sr or {}},
                       "step-graphs": {"g_iterations_per_s": 60.0}},
            "concurrent_variant": variant,
            "concurrent": {str(n): {"g_iterations_per_s_total": total} for n, total in (processes or {1: 60.0}).items()},
            "in_one_process": {str(n): {"status": status, "g_iterations_per_s_total": total,
                                        "warmup_losses_difference_to_single": differences}
                               for n, (status, total, differences) in (in_process or {}).items()}}


PASSED = {"exit": 0, "summary": "8 passed in 41.2s", "passed": True}


def test_each_setting_is_chosen_only_where_it_measured_better_and_agreed():
    assert choose({}, PASSED)[0] == []  # nothing measured: the study's base settings
    assert choose(section(variant="eager"), PASSED)[0] == []
    assert choose(section(), PASSED)[0] == STEP_GRAPHS
    # 6 in one process did most in all; 4 processes less; the disagreeing, failed and too large levels are not
    levels = {4: ("ok", 150.0, AGREES), 6: ("ok", 210.0, AGREES), 16: ("ok", 300.0, AGREES),
              32: ("ok", 400.0, [0.5] * 5), 8: ("error", None, None)}
    arguments, reasons = choose(section(in_process=levels, processes={1: 60.0, 4: 90.0}), PASSED)
    assert arguments == STEP_GRAPHS + ["--per-process", "6"] and "210.0 G-iterations/s in all" in reasons[-1]
    assert "--per-process" not in choose(section(in_process=levels), PASSED)[0]  # processes not measured
    assert "--per-process" not in choose(section(in_process=levels, processes={1: 60.0, 16: 250.0}), PASSED)[0]
    faster_on_cpu = {"static_cpu": 0.002, "static_device": 0.009}
    assert choose(section(sr=faster_on_cpu), PASSED)[0][-2:] == ["--set", "performance.sr_on_cpu=true"]
    assert "performance.sr_on_cpu=true" not in choose(section(sr={"static_cpu": 0.02, "static_device": 0.009}),
                                                      PASSED)[0]


def test_runs_in_one_process_agree_by_the_limits_the_run_recorded():
    """A run's first stream strays from the single run as far as rounding carries eager (late warm-up iterations):
    within the section's yardstick-based limits it agrees; beyond them, or without limits beyond 1e-2, it does not."""
    late = [0.0, 1e-4, 0.0, 2e-3, 0.08]
    levels, processes = {4: ("ok", 150.0, late)}, {1: 60.0, 4: 90.0}
    assert "--per-process" not in choose(section(in_process=levels, processes=processes), PASSED)[0]
    judged = dict(section(in_process=levels, processes=processes), agreement_limits={"losses": [0.01] * 4 + [0.5]})
    assert choose(judged, PASSED)[0] == STEP_GRAPHS + ["--per-process", "4"]
    judged["agreement_limits"]["losses"][-1] = 0.05
    assert "--per-process" not in choose(judged, PASSED)[0]
    assert choose(section(variant="eager-fused-adam"), PASSED)[0] == FUSED_ADAM  # fused Adam alone was the fastest


@pytest.mark.parametrize("tests", [None, {"exit": 1, "summary": "1 failed, 7 passed in 40s", "passed": False},
                                   {"exit": 0, "summary": "8 skipped in 3s", "passed": False}])
def test_nothing_is_chosen_unless_the_same_run_passed_the_gpu_only_tests(tests):
    arguments, reasons = choose(section(in_process={4: ("ok", 150.0, AGREES)}, processes={1: 60.0, 4: 90.0},
                                        sr={"static_cpu": 0.002, "static_device": 0.009}), tests)
    assert arguments == [] and "GPU-only tests did not pass" in reasons[0]


STUB = """#!/usr/bin/env bash
echo "8 passed" > "$OUT/gpu_tests.log"
echo "bench log" > "$OUT/gpu_bench.log"
cat > "$OUT/gpu_stub.json" <<'JSON'
{json}
JSON
"""


def test_one_call_measures_then_runs_a_chunk_with_what_it_measured(tmp_path):
    study_file = write_study(tmp_path, 4, a={}, b={})
    results = {"sections": {"d_small_models": dict(section(in_process={2: ("ok", 100.0, AGREES)},
                                                           processes={1: 60.0, 2: 70.0}), gpu_tests=PASSED)}}
    stub = tmp_path / "run.sh"
    stub.write_text(STUB.replace("{json}", json.dumps(results)))
    out, carry, root = tmp_path / "out", tmp_path / "carry", tmp_path / "runs"
    out.mkdir()
    carry.mkdir()
    (carry / "study.json").write_text(json.dumps({"study": "study"}))
    env = {**os.environ, "OUT": str(out), "RUN_SH": str(stub), "STUDY_CARRY": str(carry)}
    completed = subprocess.run(["bash", "benchmarks/gpu/measure_then_study.sh", "60", str(study_file), "120", "--root",
                                str(root)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert not (out / "gpu_tests.log").exists() and "8 passed" in (out / "gpu_bench.log").read_text()
    chunk = json.loads((root / "chunks.jsonl").read_text().splitlines()[-1])
    assert "trains 120 s with: --set performance.step_graphs=true" in completed.stdout
    assert chunk["per_process"] == 2 and "performance.step_graphs=true" in chunk["performance"]
    study = load_study(study_file)
    assert [state.status(study, root, run) for run in study.runs] == ["done", "done"]
    assert (out / "progress.json").is_file()


def gpu_tests_stand_in(tmp_path: Path, outcome: str) -> Path:
    """gpu_tests.sh's stand-in: appends a log that ends as ``outcome`` to its first argument, and what it was given."""
    stub = tmp_path / "gpu_tests.sh"
    stub.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "given $*" "{outcome}" >> "$1"\n')
    return stub


@pytest.mark.parametrize("outcome, chosen", [("9 passed in 19.1s\npytest exit 0", True),
                                             ("1 failed, 8 passed in 20.3s\npytest exit 1", False),
                                             ("9 skipped in 3.0s\npytest exit 0", False)])
def test_with_no_measuring_budget_the_committed_results_choose_if_the_gpu_tests_pass_here(tmp_path, outcome, chosen):
    """RESULTS= names them; the GPU-only tests run first, on this code and machine, from the carry's wheels, and
    their log begins the chunk's; no time is left for a chunk here (CALL_S: the chunk itself is the test above's)."""
    study_file = write_study(tmp_path, 2, a={})
    results = tmp_path / "gpu_committed.json"
    results.write_text(json.dumps({"sections": {"d_small_models": dict(section(), gpu_tests=PASSED)}}))
    out, carry, root = tmp_path / "out", tmp_path / "carry", tmp_path / "runs"
    out.mkdir()
    carry.mkdir()
    env = {**os.environ, "OUT": str(out), "RUN_SH": "/nonexistent", "STUDY_CARRY": str(carry), "RESULTS": str(results),
           "CALL_S": "100", "GPU_TESTS_SH": str(gpu_tests_stand_in(tmp_path, outcome))}
    completed = subprocess.run(["bash", "benchmarks/gpu/measure_then_study.sh", "0", str(study_file), "120", "--root",
                                str(root)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert f"section (d) of {results}" in completed.stderr
    assert ("step graphs: 60.0 G-iterations/s" in completed.stderr) == chosen
    assert chosen or f"did not pass ({outcome.splitlines()[0]}" in completed.stderr
    assert (out / "chunk.log").read_text().startswith(f"given {out / 'chunk.log'} {carry / 'wheels'}\n")
    assert "none started" in completed.stdout and [path.name for path in out.iterdir()] == ["chunk.log"]
    assert not root.exists()




def test_without_results_named_the_machines_own_file_is_read(tmp_path, capsys, monkeypatch):
    """Several devices' results committed (measure_then_study.sh 0 without RESULTS=: study_settings.py --dir): the
    file of the GPU it runs on, and with none of that GPU's, the study's base settings."""
    from benchmarks.gpu.common import device_name, pick_device, slug
    from benchmarks.gpu.study_settings import main

    (tmp_path / "gpu_other-gpu.json").write_text(json.dumps({"sections": {"d_small_models": section(variant="eager")}}))
    own = tmp_path / f"gpu_{slug(device_name(pick_device()))}.json"
    own.write_text(json.dumps({"sections": {"d_small_models": dict(section(), gpu_tests=PASSED)}}))
    assert main(["--dir", str(tmp_path)]) == 0
    printed = capsys.readouterr()
    assert printed.out.split() == STEP_GRAPHS and f"section (d) of {own}" in printed.err
    own.rename(tmp_path / "gpu_third-gpu.json")
    assert main(["--dir", str(tmp_path)]) == 0
    printed = capsys.readouterr()
    assert printed.out.strip() == "" and f"is {own.name}" in printed.err and "base settings" in printed.err
    (tmp_path / "gpu_third-gpu.json").unlink()  # one file alone: on a GPU, whichever GPU measured it
    from benchmarks.gpu import study_settings
    monkeypatch.setattr(study_settings, "pick_device", lambda: torch.device("cpu"))
    assert main(["--dir", str(tmp_path)]) == 0  # on a machine without one, no GPU's numbers
    printed = capsys.readouterr()
    assert printed.out.strip() == "" and "no GPU here, and gpu_other-gpu.json is another device's" in printed.err
    monkeypatch.setattr(study_settings, "pick_device", lambda: torch.device("cuda"))
    monkeypatch.setattr(study_settings, "device_name", lambda device: "Another GPU")
    assert main(["--dir", str(tmp_path)]) == 0 and "section (d) of" in capsys.readouterr().err
    assert main(["--dir"]) == 2 and main(["a.json", "b.json"]) == 2


def test_a_later_run_whose_gpu_only_tests_failed_withdraws_an_earlier_runs_numbers(tmp_path, capsys):
    """merge.py keeps an earlier (d) when the later run's is not ok; the later run's failing tests (``protocol``)
    still decide: the code and machine that (d) measured no longer passed them."""
    from benchmarks.gpu.study_settings import main

    failed = {"exit": 1, "summary": "1 failed, 8 passed in 50s", "passed": False}
    merged = tmp_path / "gpu_merged.json"
    merged.write_text(json.dumps({"protocol": {"gpu_tests": failed},
                                  "sections": {"d_small_models": dict(section(), gpu_tests=PASSED)}}))
    assert main([str(merged)]) == 0
    printed = capsys.readouterr()
    assert printed.out.strip() == "" and "1 failed, 8 passed" in printed.err
    merged.write_text(json.dumps({"protocol": {"gpu_tests": PASSED},
                                  "sections": {"d_small_models": dict(section(), gpu_tests=PASSED)}}))
    assert main([str(merged)]) == 0 and capsys.readouterr().out.split() == STEP_GRAPHS
    merged.write_text("[1, 2]")
    assert main([str(merged)]) == 0 and "base settings" in capsys.readouterr().err


def test_a_warm_machines_own_measurements_come_first_and_the_chunk_budget_is_read_leniently(tmp_path):
    """measure_then_study.sh 0 in the call after run.sh's, on the same machine: its results (MEASURED_HERE), not the
    committed ones; CHUNK_BUDGET "auto" or with a fraction is accepted, anything else refused before anything runs."""
    from benchmarks.gpu.common import device_name, pick_device, slug

    study_file = write_study(tmp_path, 2, a={})
    measured, committed = tmp_path / "measured", tmp_path / "committed"
    for folder, variant in ((measured, "step-graphs"), (committed, "eager")):
        folder.mkdir()
        own = folder / f"gpu_{slug(device_name(pick_device()))}.json"
        own.write_text(json.dumps({"sections": {"d_small_models": dict(section(variant=variant), gpu_tests=PASSED)}}))
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OUT": str(out), "RUN_SH": "/nonexistent", "MEASURED_HERE": str(measured),
           "RESULTS_DIR": str(committed), "CALL_S": "100",
           "GPU_TESTS_SH": str(gpu_tests_stand_in(tmp_path, "9 passed in 19.1s\npytest exit 0"))}

    def call(chunk: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "benchmarks/gpu/measure_then_study.sh", "0", str(study_file), chunk],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    for chunk in ("auto", "150.7"):
        completed = call(chunk)
        assert completed.returncode == 0, completed.stderr[-2000:]
        assert f"section (d) of {measured}" in completed.stderr and "none started" in completed.stdout
    (measured / own.name).unlink()  # a fresh machine: nothing measured here yet
    assert f"section (d) of {committed}" in call("auto").stderr
    (out / "chunk.log").unlink()  # the GPU-only tests' and the chunk's
    refused = call("soon")
    assert refused.returncode == 2 and "must be seconds or auto" in refused.stderr
    assert not list(out.iterdir())  # refused before the tests
    del env["OUT"]  # the tests' 2 minutes, then no folder to return the chunk in: refused first
    refused = call("auto")
    assert refused.returncode == 2 and "$OUT must name the folder the device call returns" in refused.stderr
