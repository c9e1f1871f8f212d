"""CPU smoke test of scripts/benchmark_ddp.py (gloo): both launch modes, the settings grid, and that each setting's
knobs reach the DDP object. Checks structure and arithmetic, not speed (2 shared cores)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_ddp.py"
# one warm-up step and two timed windows of one step: every code path, cheap
TINY = ["--device", "cpu", "--dtype", "fp32", "--batch-size", "2", "--img-size", "32", "--num-classes", "10",
        "--warmup", "1", "--iters", "1", "--repeats", "2", "--gpu-warmup-s", "0"]


@pytest.fixture(scope="module")
def bench_ddp():
    spec = importlib.util.spec_from_file_location("vm_benchmark_ddp_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_settings_grid_and_parsing(bench_ddp):
    full = bench_ddp.settings_grid("full")
    labels = [bench_ddp.setting_label(o) for o in full]
    assert len(labels) == len(set(labels)) == 3 * 2 * 2 + 2
    assert labels[0] == "ddp:bucket=25,view=0,static=0" and labels[-2:] == ["fsdp2", "fsdp2:param_dtype=bf16"]
    assert sum(bench_ddp.is_repo_default(o) for o in full) == 1  # our defaults are one of the combinations
    oat = [bench_ddp.setting_label(o) for o in bench_ddp.settings_grid("oat")]
    assert oat == ["ddp:bucket=25,view=0,static=0", "ddp:bucket=100,view=0,static=0",
                   "ddp:bucket=200,view=0,static=0", "ddp:bucket=25,view=1,static=0", "ddp:bucket=25,view=0,static=1",
                   "fsdp2"]  # ours (bucket 25 + views) coincides with the fourth
    for text in ("ddp:bucket=100,view=1,static=0", "fsdp2:param_dtype=bf16,reshard=0"):
        assert bench_ddp.setting_label(bench_ddp.parse_setting(text)) == text
    with pytest.raises(ValueError, match="key=value"):
        bench_ddp.parse_setting("ddp:buckets=3")
    with pytest.raises(ValueError, match="ddp:... or fsdp2"):
        bench_ddp.parse_setting("zero3")


def _check_rows(rows, nproc, settings):
    single = [r for r in rows if r["setting"] == "single (no wrapper)"]
    assert len(single) == 1 and single[0]["nproc"] == 1 and single[0]["efficiency"] == pytest.approx(1.0)
    multi = [r for r in rows if r["nproc"] == nproc]
    assert [r["setting"] for r in multi] == settings
    for r in multi:
        assert r["error"] is None and r["img_s"] > 0 and r["backend"] == "ref"
        assert r["img_s_per_gpu"] == pytest.approx(r["img_s"] / nproc)
        assert r["img_s"] == pytest.approx(nproc * 2 * 1e3 / r["step_ms"])  # all ranks' images per step
        assert r["efficiency"] == pytest.approx(r["img_s"] / (nproc * single[0]["img_s"]))
        assert len(r["step_ms_windows"]) == 2
    return {r["setting"]: r for r in multi}


def test_driver_launches_each_process_count(tmp_path, fw):
    out = tmp_path / "ddp.json"
    settings = ["ddp:bucket=25,view=0,static=0", "ddp:bucket=1,view=1,static=1", "fsdp2"]
    proc = fw.run_script(["scripts/benchmark_ddp.py", "vim_test", "--nproc", "1", "2", *TINY, "--settings", *settings,
                          "--json", str(out)], tmp_path, timeout=400)
    result = json.loads(out.read_text())
    by_setting = _check_rows(result["rows"], 2, settings)
    # what the DDP objects were built with
    assert by_setting[settings[0]]["knobs"] == dict(bucket_bytes_cap=25 * 2**20, gradient_as_bucket_view=False,
                                                    static_graph=False)
    assert by_setting[settings[1]]["knobs"] == dict(bucket_bytes_cap=2**20, gradient_as_bucket_view=True,
                                                    static_graph=True)
    assert by_setting["fsdp2"]["knobs"] == dict(sharded_units=4 + 1)  # vim_test's 4 blocks + the root
    assert by_setting[settings[1]]["repo_default"] is False
    assert result["env"]["cpu_cores"] >= 1 and result["env"]["torch"]
    table = result["table"]
    assert table in proc.stdout and "eff." in table and "best on 2 GPUs for vim_test" in table


def test_worker_mode_under_torchrun_measures_its_own_baseline(tmp_path, fw):
    out = tmp_path / "ddp.json"
    proc = fw.run_script(["scripts/benchmark_ddp.py", "vim_test", *TINY, "--settings", "ddp:view=1", "--profile",
                          "--profile-steps", "1", "--json", str(out)], tmp_path, timeout=400, torchrun_nproc=2)
    result = json.loads(out.read_text())
    _check_rows(result["rows"], 2, ["ddp:bucket=25,view=1,static=0"])
    # --profile: one profile per rank that trained (the baseline's rank 0; both DDP ranks), printed per rank
    assert [len(r["profiles"]) for r in result["rows"]] == [1, 2]
    # the backward pass is in each profile (e.g. SelectiveScanRefBackward, aten::convolution_backward: which of them
    # makes the top rows depends on the machine's timing, so the match ignores case)
    assert all(p["unit"] == "cpu" and "backward" in p["table"].lower() for r in result["rows"] for p in r["profiles"])
    assert "x2, rank 1 (train step)" in proc.stdout
    assert result["rows"][-1]["repo_default"] is True  # bucket 25 + gradient views = conf/train.yaml
    assert "ddp:bucket=25,view=1,static=0 *" in proc.stdout
