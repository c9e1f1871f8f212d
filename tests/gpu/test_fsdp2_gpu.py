"""distributed.strategy=fsdp2 on two GPUs (NCCL) through ``torchrun train.py``: the CUDA kernels, bf16 autocast with
ShuffleMamba's GradScaler, the layer-wise shuffle, gradient accumulation, clipping and an EMA, against DDP with the
same seed; then the FSDP2 run resumes from its checkpoint. The CPU twin (gloo, fp32, exact comparison) is
tests/test_fsdp2.py; this one checks the GPU path and tolerates bf16 / atomics noise. Skipped without 2 GPUs."""
from __future__ import annotations

import json

import pytest
import torch

from visionmamba.parallel import fsdp2_available

pytestmark = [
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
    pytest.mark.skipif(not fsdp2_available(), reason="this torch has no torch.distributed.fsdp.fully_shard"),
]

# 512 images = 2 updates of 64 x 2 micro-batches x 2 ranks per epoch; 301 val images in batches of 75: rank 0
# scores 151 in 3 batches, rank 1 150 in 2 (so it pads one forward under FSDP2)
ARGS = ["model=shufflemamba_tiny", "data=synthetic", "data.img_size=64",
        "data.num_classes=100", "data.train_length=512", "data.val_length=301", "eval_batch_size=75",
        "regularizer=none", "regularizer.shuffle.rate=0.5",
        "regularizer.ema.enabled=true", "regularizer.ema.decay=0.5", "precision=bf16", "use_grad_scaler=true",
        "kernel_backend=cuda", "workers=0", "batch_size=64", "accum_steps=2", "clip_grad=3.0", "progress=line",
        "log_every=1", "optimizer.scale_lr=false", "optimizer.base_lr=1e-3", "optimizer.schedule.warmup_epochs=0",
        "optimizer.schedule.min_lr=1e-3", "mlflow.enabled=false"]


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def test_fsdp2_on_two_gpus_trains_like_ddp_and_resumes(tmp_path, torchrun_train):
    _torchrun = lambda cwd, *overrides: torchrun_train(cwd, *ARGS, *overrides)  # noqa: E731
    _torchrun(tmp_path, "run_name=ddp", "epochs=2")
    out = _torchrun(tmp_path, "run_name=fsdp2", "epochs=2", "distributed.strategy=fsdp2")
    assert "distributed: fsdp2" in out and "backend=cpu:gloo,cuda:nccl" in out
    runs = tmp_path / "outputs"
    ddp = json.loads((runs / "ddp" / "final_metrics.json").read_text())
    fsdp2 = json.loads((runs / "fsdp2" / "final_metrics.json").read_text())
    assert fsdp2["global_step"] == ddp["global_step"] == 4
    assert len(set(fsdp2["replica_digests"])) == 1
    for key in ("train/epoch_loss", "val/loss", "val_ema/loss"):
        assert fsdp2[key] == pytest.approx(ddp[key], rel=2e-2), key
    ddp_state = torch.load(runs / "ddp" / "checkpoints" / "epoch_0002.pth", map_location="cpu", weights_only=True)
    fsdp2_state = torch.load(runs / "fsdp2" / "checkpoints" / "epoch_0002.pth", map_location="cpu",
                             weights_only=True)
    assert fsdp2_state["model"].keys() == ddp_state["model"].keys()
    # all weights as one vector (bf16 autocast and the kernels' atomics make single small tensors noisy)
    flat = {name: torch.cat([state[k].flatten() for k in sorted(ddp_state["model"])])
            for name, state in (("ddp", ddp_state["model"]), ("fsdp2", fsdp2_state["model"]))}
    error = _rel_l2(flat["fsdp2"], flat["ddp"])
    assert error < 5e-3, f"FSDP2 weights differ from DDP's by rel_l2 {error:.3e}"
    assert fsdp2_state["scaler"] is not None and fsdp2_state["scaler"]["scale"] > 0

    resumed = _torchrun(tmp_path, "run_name=fsdp2", "epochs=3", "distributed.strategy=fsdp2")
    assert "resuming from" in resumed and "epoch_0002.pth" in resumed
    final = json.loads((runs / "fsdp2" / "final_metrics.json").read_text())
    assert final["epoch"] == 3 and final["global_step"] == 6 and len(set(final["replica_digests"])) == 1
