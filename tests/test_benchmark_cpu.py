"""CPU smoke test of scripts/benchmark.py: tiny settings, checks the table / JSON structure (not the speed)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("vm_benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


# One warm-up step and one timed window of 2 steps: enough to exercise every code path, cheap on a shared CPU.
TINY = ["--device", "cpu", "--batch-size", "2", "--img-size", "32", "--warmup", "1", "--iters", "2",
        "--repeats", "1", "--dtype", "fp32"]  # bf16 autocast is slow on CPUs without bf16 units


def test_benchmark_cpu_table_and_json(bench, tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    result = bench.main(["vim_test", "vim_test@shuffle=on,label=vim_test_shuffled", *TINY, "--json", str(out_json)])
    printed = capsys.readouterr().out

    on_disk = json.loads(out_json.read_text())
    assert on_disk["rows"] == json.loads(json.dumps(result["rows"], default=str))
    assert on_disk["env"]["device_type"] == "cpu"
    assert on_disk["config"]["batch_size"] == 2 and on_disk["config"]["dtype"] == "fp32"

    rows = result["rows"]
    assert [r["label"] for r in rows] == ["vim_test", "vim_test_shuffled"]
    for r in rows:
        assert r["error"] is None, r["error"]
        assert r["family"] == "visionmamba" and r["backend"] == "ref"  # auto on CPU resolves to the reference
        assert r["params_m"] > 0
        for phase in ("train", "infer"):
            p = r[phase]
            assert p["img_s"] > 0 and p["step_ms"] > 0 and len(p["step_ms_windows"]) == 1 and p["spread"] == 0.0
            assert p["peak_mem_gib"] is None  # no allocator statistics on CPU
        assert set(r["ratios"]) == {"train_img_s", "infer_img_s"}
    assert rows[0]["ratios"] == {"train_img_s": 1.0, "infer_img_s": 1.0}  # the baseline against itself
    assert rows[0]["shuffle_rate"] == 0.0  # vim_test default
    assert rows[1]["shuffle_rate"] == bench.DEFAULT_SHUFFLE_ON  # shuffle=on for a model without its own rate

    table = result["table"]
    assert table in printed
    assert "baseline: vim_test" in table and "train img/s" in table and "infer img/s" in table
    assert len(table.splitlines()) == 3 + len(rows)


def test_benchmark_cpu_timm_baseline_profile_and_failing_row(bench, capsys):
    result = bench.main(["deit_tiny_patch16_224", "vim_test@backend=cuda", "vim_test@backend=ref,shuffle=off",
                         *TINY, "--mode", "train", "--profile", "--profile-rows", "vim_test",
                         "--profile-steps", "1", "--profile-top", "5"])
    printed = capsys.readouterr().out
    base, cuda_row, vim = result["rows"]
    assert base["family"] == "timm" and base["backend"] == "n/a" and base["error"] is None
    assert base["infer"] is None and base["train"]["img_s"] > 0
    # Asking for the CUDA kernels on a CPU is an error for that row only, reported in the table.
    assert cuda_row["error"] and "KernelUnavailableError" in cuda_row["error"]
    assert "ERROR" in result["table"]
    assert vim["error"] is None and vim["ratios"]["train_img_s"] > 0
    assert vim["backend"] == "ref" and vim["shuffle_rate"] == 0.0
    assert list(result["profiles"]) == ["vim_test@backend=ref,shuffle=off"]  # --profile-rows matches model names
    assert "== profile: vim_test@backend=ref,shuffle=off" in printed


def test_benchmark_cpu_interleaved(bench, capsys):
    result = bench.main(["vim_test", "vim_test@shuffle=off,repeats=2", *TINY, "--mode", "infer", "--interleave",
                         "--profile", "--profile-steps", "1"])
    printed = capsys.readouterr().out
    # with --mode infer the profiler records inference steps (and says so)
    assert [(label, p["phase"]) for label, p in result["profiles"].items()] == [
        ("vim_test", "infer"), ("vim_test@shuffle=off,repeats=2", "infer")]
    assert "== profile: vim_test (inference step) ==" in printed
    first, second = result["rows"]
    assert first["error"] is None and second["error"] is None
    assert len(first["infer"]["step_ms_windows"]) == 1 and len(second["infer"]["step_ms_windows"]) == 2
    assert first["train"] is None and second["infer"]["spread"] >= 0.0
    assert "rows interleaved" in result["table"]


def test_row_parsing(bench):
    defaults = bench.build_parser().parse_args(["x"])
    assert (defaults.dtype, defaults.batch_size, defaults.img_size, defaults.backend) == ("bf16", 128, 224, "auto")
    args = bench.build_parser().parse_args(["x", "--backend", "ref", "--compile"])
    spec = bench.parse_row("vim_tiny@backend=cuda,shuffle=0.3,compile=0,label=fast", args)
    assert (spec.model, spec.backend, spec.shuffle, spec.compile, spec.label) == ("vim_tiny", "cuda", "0.3", False,
                                                                                  "fast")
    spec = bench.parse_row("vim_tiny@backend=ref,warmup=0,iters=1,repeats=2", args)
    assert (spec.warmup, spec.iters, spec.repeats) == (0, 1, 2)
    with pytest.raises(ValueError, match="iters"):
        bench.parse_row("vim_tiny@iters=0", args)
    spec = bench.parse_row("vim_tiny", args)
    assert (spec.warmup, spec.iters, spec.repeats) == (args.warmup, args.iters, args.repeats)
    assert (spec.backend, spec.shuffle, spec.compile, spec.label) == ("ref", "default", True, "vim_tiny")
    with pytest.raises(ValueError, match="key=value"):
        bench.parse_row("vim_tiny@speed=fast", args)
    with pytest.raises(ValueError, match="shuffle"):
        bench.parse_row("vim_tiny@shuffle=sometimes", args)


def test_gpu_busy_fraction_merges_overlapping_kernels(bench):
    # kernels [0, 10] and [5, 12] overlap (two streams), then an idle gap to [20, 25]
    span, busy = bench._busy([(20, 25), (0, 10), (5, 12)])
    assert (span, busy) == (25, 17)
    assert bench._busy([]) == (0.0, 0.0)


def test_row_compile_modes(bench):
    args = bench.build_parser().parse_args(["x"])
    spec = bench.parse_row("vim_tiny@compile=reduce-overhead", args)
    assert (spec.compile, spec.compile_mode) == (True, "reduce-overhead")
    assert bench.parse_row("vim_tiny@compile=1", args).compile_mode == "default"
    assert bench.parse_row("vim_tiny@compile=0", args).compile is False
    with pytest.raises(ValueError, match="compile must be"):
        bench.parse_row("vim_tiny@compile=fastest", args)


def test_gpu_time_line_gives_ratios_to_the_profiled_baseline(bench):
    """The footer with kernel time per step (what a GPU profile measured): ratios only against a profiled baseline."""
    rows = [bench.RowResult(label=name, model="m", family="visionmamba") for name in ("stock", "fast", "deit")]
    profiles = {"stock": {"total_gpu_us_per_step": 112_400.0}, "fast": {"total_gpu_us_per_step": 32_360.0},
                "deit": {"unit": "cpu", "table": "..."}}  # a CPU profile has no kernel time: left out
    (line,) = bench.gpu_time_lines(rows, profiles)
    assert line.endswith("stock 112.40 ms; fast 32.36 ms (3.47x)")
    assert bench.gpu_time_lines(rows, {"fast": profiles["fast"]})[0].endswith("fast 32.36 ms")  # no baseline: no x
    assert bench.gpu_time_lines(rows, {}) == []
