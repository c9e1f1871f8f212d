"""Multi-stage training: the stage hand-over (``init_from``) and ``scripts/run_stages.py``.

The hand-over follows the official ``--finetune`` code (spec §4.6): last raw weights of the previous run, bicubic
position-embedding resize, registers re-laid for the new grid, a classifier of another size dropped, and a fresh
optimizer / schedule / EMA, but every resized or dropped tensor is reported instead of a silent ``strict=False``.
The end-to-end test runs the CPU two-stage recipe (tiny Vim on digits at 24 px, then 32 px).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import train
from visionmamba import create_model
from visionmamba.distributed import DistInfo
from visionmamba.layers import register_layout
from visionmamba.models._pretrained import load_pretrained

REPO = Path(__file__).resolve().parents[1]
CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
RECIPE = "digits_two_stage"


def official_finetune_pos_embed(pos_embed: torch.Tensor, num_extra: int, new_side: int) -> torch.Tensor:
    """The official ``--finetune`` pos-embed code (main*.py), written out independently of ours."""
    dim = pos_embed.shape[-1]
    extra, tokens = pos_embed[:, :num_extra], pos_embed[:, num_extra:]
    side = int((pos_embed.shape[-2] - num_extra) ** 0.5)
    tokens = tokens.reshape(-1, side, side, dim).permute(0, 3, 1, 2)
    tokens = F.interpolate(tokens, size=(new_side, new_side), mode="bicubic", align_corners=False)
    return torch.cat((extra, tokens.permute(0, 2, 3, 1).flatten(1, 2)), dim=1)


# ---- the hand-over, in process ------------------------------------------------------------------------------------
def test_reg_handover_resizes_bicubically_relays_registers_and_reports_the_head(tmp_path):
    """ShuffleMamba-Reg 128 px -> 224 px in miniature: 4x4 -> 8x8 grid, 4 registers, a new label set."""
    torch.manual_seed(0)
    stage1 = create_model("shufflemamba_reg_test", num_classes=10)  # 32 px, patch 8
    path = tmp_path / "stage1.pth"
    torch.save({"model": stage1.state_dict()}, path)
    stage2 = create_model("shufflemamba_reg_test", num_classes=5, img_size=64)
    report = load_pretrained(stage2, path)

    # pos_embed: patches only (no extra rows), bicubic as the official code
    torch.testing.assert_close(stage2.pos_embed, official_finetune_pos_embed(stage1.pos_embed, 0, 8), rtol=0, atol=0)
    # registers and their embeddings are copied; their places in the sequence follow the new grid
    torch.testing.assert_close(stage2.cls_token, stage1.cls_token, rtol=0, atol=0)
    torch.testing.assert_close(stage2.pos_embed_cls, stage1.pos_embed_cls, rtol=0, atol=0)
    n_reg = stage2.num_registers
    for model, patches in ((stage1, 16), (stage2, 64)):
        seg = patches // (n_reg + 1)  # official utils.get_cls_idx
        assert model.readout_positions(model.grid).tolist() == list(range(seg, seg * (n_reg + 1) + n_reg, seg + 1))
    assert register_layout(64, n_reg)[1].tolist() != register_layout(16, n_reg)[1].tolist()
    # a classifier of another size is dropped (and said so); everything else loaded
    assert report.resized == ["pos_embed 4x4->8x8"]
    assert [d.split(" ")[0] for d in report.dropped] == ["head.weight", "head.bias"]
    assert not report.missing and not report.unexpected
    torch.testing.assert_close(stage2.neck.weight, stage1.neck.weight, rtol=0, atol=0)
    tags = report.tags()
    assert tags["init_from.resized"] == "pos_embed 4x4->8x8" and "head.weight (10, 128)->(5, 128)" in tags[
        "init_from.dropped"]
    assert json.loads(json.dumps(report.as_dict()))["dropped"] == report.dropped
    with torch.no_grad():
        assert stage2.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_vim_handover_keeps_the_cls_row_or_reproduces_the_official_quirk(tmp_path):
    """Vim (cls in the middle): by default the cls row moves to the new middle; pos_embed_mode="official"
    reproduces the official code, which treats row 0 as the extra token (spec §4.6, the Vim-T+/S+ fine-tunes)."""
    torch.manual_seed(0)
    source = create_model("vim_test")  # 4x4 grid + cls at index 8
    path = tmp_path / "pt.pth"
    torch.save({"model": source.state_dict()}, path)

    exact = create_model("vim_test", img_size=64)
    load_pretrained(exact, path)
    torch.testing.assert_close(exact.pos_embed[:, 32], source.pos_embed[:, 8], rtol=0, atol=0)

    official = create_model("vim_test", img_size=64)
    report = load_pretrained(official, path, pos_embed_mode="official")
    torch.testing.assert_close(official.pos_embed, official_finetune_pos_embed(source.pos_embed, 1, 8),
                               rtol=0, atol=0)
    assert report.resized == ["pos_embed 4x4->8x8 (official Vim row order)"]
    # both give the stride-8-style model a working sequence
    with torch.no_grad():
        assert torch.isfinite(official.eval()(torch.randn(1, 3, 64, 64))).all()


@pytest.mark.usefixtures("one_thread")
def test_init_from_starts_a_fresh_run_from_the_loaded_weights(tmp_path, fw):
    """train.py's build_job with init_from: weights loaded (pos-embed resized, other head dropped), EMA starting
    from them, optimizer without state, schedule at its start."""
    torch.manual_seed(0)
    source = create_model("vim_test", num_classes=7, img_size=24)
    path = tmp_path / "prev.pth"
    torch.save({"model": source.state_dict(), "model_ema": source.state_dict()}, path)
    cfg = fw.compose_train(*fw.synthetic_args("stage2"), "epochs=3", f"init_from={path}",
                           f"output_dir={tmp_path / 'outputs'}", "regularizer.ema.enabled=true")
    job = train.build_job(cfg, CPU)
    torch.testing.assert_close(job.model.layers[1].mixer.A_log, source.layers[1].mixer.A_log, rtol=0, atol=0)
    assert job.model.pos_embed.shape == (1, 17, 64) and job.model.head.out_features == 10
    for key, value in job.model.state_dict().items():
        torch.testing.assert_close(job.ema.module.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert all(not state for state in job.optimizer.state.values())
    assert job.scheduler.last_epoch == -1 and job.start_epoch == 0 and job.num_updates == 0


# ---- run_stages.py ------------------------------------------------------------------------------------------------
def test_launcher_commands_for_8_gpus_and_n_nodes():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import run_stages
    finally:
        sys.path.remove(str(REPO / "scripts"))
    stages = run_stages.load_recipe("shufflemamba_reg_base")
    args = SimpleNamespace(nproc_per_node=8, nnodes=4, node_rank=2, rdzv_endpoint="host0:29500", rdzv_id=None)
    commands = run_stages.stage_commands("shufflemamba_reg_base", stages, args, ["data.root=/imagenet"])
    assert [name for name, _, _ in commands] == ["128pt", "224mid", "224ft"]
    for i, (name, run_dir, cmd) in enumerate(commands):
        assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node=8" in cmd and "--nnodes=4" in cmd
        assert "--node_rank=2" in cmd and f"--rdzv_id=shufflemamba_reg_base-{name}" in cmd
        assert f"run_name=shufflemamba_reg_base-{name}" in cmd and cmd[-1] == "data.root=/imagenet"
        assert run_dir == Path("outputs") / f"shufflemamba_reg_base-{name}"
        if i:
            assert f"init_from={commands[i - 1][1]}" in cmd
    single = run_stages.stage_commands("vim_tiny", run_stages.load_recipe("vim_tiny"),
                                       SimpleNamespace(nproc_per_node=1, nnodes=1), ["output_dir=/runs"])
    assert single[0][2][1].endswith("train.py") and "init_from=/runs/vim_tiny-pt" in single[1][2]


def _two_stage_run(getfixture):
    """The commands behind ``two_stage`` (conftest's ``runs_ahead`` starts them when the session starts): the recipe,
    then validate.py on the final stage's checkpoint. The MLflow store is their own: the session's shared one may be
    written by a test running meanwhile."""
    fw, cwd = getfixture("fw"), getfixture("tmp_path_factory").mktemp("stages")
    store = f"sqlite:///{cwd / 'mlflow.db'}"
    args = ["scripts/run_stages.py", RECIPE, f"data.root={getfixture('digits_root')}", "workers=0", "progress=line",
            "epochs=1", *fw.tracking_args(store, "multistage")]
    large = cwd / "outputs" / f"{RECIPE}-large"

    def job(run_script) -> SimpleNamespace:
        stages = run_script(args, cwd, timeout=600)
        validated = run_script(["validate.py", f"checkpoint={large / 'checkpoints' / 'epoch_0001.pth'}", "workers=0"],
                               cwd, check=False)  # its exit status is test_validate_evaluates_the_final_stage's
        return SimpleNamespace(cwd=cwd, args=args, output=stages.stdout, validated=validated,
                               store=store, small=cwd / "outputs" / f"{RECIPE}-small", large=large)

    return job


RUNS_AHEAD = {"two_stage": _two_stage_run}


@pytest.fixture(scope="module")
def two_stage(runs_ahead, request) -> SimpleNamespace:
    """``scripts/run_stages.py digits_two_stage`` (one epoch per stage), as a user runs it, then ``validate.py`` on
    the final checkpoint (checked by test_validate_evaluates_the_final_stage)."""
    return runs_ahead.result("two_stage", _two_stage_run, request.getfixturevalue)


def test_two_stages_end_with_a_higher_resolution_model(two_stage):
    small = torch.load(two_stage.small / "checkpoints" / "epoch_0001.pth", map_location="cpu", weights_only=True)
    large = torch.load(two_stage.large / "checkpoints" / "epoch_0001.pth", map_location="cpu", weights_only=True)
    assert small["config"]["data"]["img_size"] == 24 and large["config"]["data"]["img_size"] == 32
    assert small["model"]["pos_embed"].shape == (1, 10, 64) and large["model"]["pos_embed"].shape == (1, 17, 64)
    assert large["config"]["init_from"] == f"outputs/{RECIPE}-small"
    # a fresh optimization: the second stage counted its own updates from 0
    assert large["epoch"] == 1 and large["global_step"] == small["global_step"] == 1437 // 64
    log = (two_stage.large / "train.log").read_text()
    assert f"loaded model weights from outputs/{RECIPE}-small/checkpoints/epoch_0001.pth" in log
    assert "resized: pos_embed 3x3->4x4" in log
    final = json.loads((two_stage.large / "final_metrics.json").read_text())
    assert final["val/top1"] > 50.0, final  # chance is 10%
    assert f"all 2 stages done: final model in outputs/{RECIPE}-large" in two_stage.output


def test_validate_evaluates_the_final_stage(two_stage):
    """``python validate.py checkpoint=<final stage>/checkpoints/epoch_0001.pth workers=0`` (run by the fixture)."""
    proc = two_stage.validated
    assert proc.returncode == 0, f"validate.py exited with {proc.returncode}:\n{proc.stdout[-6000:]}"
    checkpoint = two_stage.large / "checkpoints" / "epoch_0001.pth"
    summary = json.loads(checkpoint.with_name("epoch_0001.val.json").read_text())
    final = json.loads((two_stage.large / "final_metrics.json").read_text())
    assert summary["img_size"] == 32 and summary["num_samples"] == 360 and summary["resized"] == []
    assert summary["top1"] == pytest.approx(final["val/top1"], abs=1e-9)
    assert "at 32 px" in proc.stdout


def test_both_stages_in_mlflow_with_recipe_and_stage_tags(two_stage, fw):
    _, runs = fw.mlflow_runs(two_stage.store, "multistage")
    tags = sorted((r.data.tags.get("recipe"), r.data.tags.get("stage"), r.info.run_name) for r in runs)
    assert tags == [(RECIPE, "large", f"{RECIPE}-large"), (RECIPE, "small", f"{RECIPE}-small")]
    large = next(r for r in runs if r.data.tags["stage"] == "large")
    assert large.data.tags["init_from"] == f"outputs/{RECIPE}-small" and large.info.status == "FINISHED"


@pytest.mark.skipif("init_report" not in train.Job.__dataclass_fields__, reason=(
    "needs the train.py change of the issue-4 report: keep init_from's LoadReport in the Job, tag it "
    "(init_from.weights / .resized / .dropped) and log init_from.json"))
def test_handover_report_is_in_mlflow(two_stage, fw):
    client, runs = fw.mlflow_runs(two_stage.store, "multistage")
    large = next(r for r in runs if r.data.tags["stage"] == "large")
    assert large.data.tags["init_from.resized"] == "pos_embed 3x3->4x4"
    assert large.data.tags["init_from.dropped"] == "none"
    assert "init_from.json" in [a.path for a in client.list_artifacts(large.info.run_id)]


def test_rerun_skips_finished_stages_and_resumes_an_unfinished_one(two_stage, fw):
    """Runs last (after the checks above): a re-run trains nothing; a stage without final_metrics.json (killed)
    is run again, which train.py turns into a resume from its newest checkpoint (tested in test_train_e2e)."""
    again = fw.run_script(two_stage.args, two_stage.cwd)
    assert again.stdout.count("done, skipped") == 2 and "epoch 1/1" not in again.stdout
    assert "all 2 stages done" in again.stdout
    _, runs = fw.mlflow_runs(two_stage.store, "multistage")
    assert len(runs) == 2
    (two_stage.large / "final_metrics.json").unlink()
    dry = fw.run_script([*two_stage.args, "--dry-run"], two_stage.cwd)
    assert "stage small: done, skipped" in dry.stdout and "stage large: would run" in dry.stdout
    assert f"run_name={RECIPE}-large" in dry.stdout and f"init_from=outputs/{RECIPE}-small" in dry.stdout
