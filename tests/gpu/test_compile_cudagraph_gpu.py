"""torch.compile with CUDA graphs (``compile=reduce-overhead``): the layer-wise shuffle stays random from replay to
replay, and ``torchrun train.py`` on two GPUs (DDP, fast kernels) trains like the eager run. Skipped without CUDA."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from visionmamba.layers import LayerwiseShuffle


@pytest.fixture(autouse=True)
def _require_cuda():  # needs CUDA + triton only, not mamba-ssm
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pytest.importorskip("triton")


class PrefixCount(nn.Module):
    """Not permutation-equivariant: token t gets 1 + the number of tokens before it, so on an all-ones input the
    restored output says where every token sat in the order the layer saw."""

    def forward(self, hidden, residual):
        return hidden.cumsum(1), hidden if residual is None else residual


def test_shuffle_under_cuda_graphs_draws_a_new_permutation_every_replay():
    torch.manual_seed(0)
    shuffle = LayerwiseShuffle(2, 0.5).train()  # p = [0, 0.5]
    layers = [PrefixCount(), PrefixCount()]

    def stack(x):
        hidden, residual = x, None
        for i, layer in enumerate(layers):
            hidden, residual = shuffle(i, layer, hidden, residual)
        return hidden

    compiled = torch.compile(stack, mode="reduce-overhead", fullgraph=True)
    L = 16
    x = torch.ones(2, L, 1, device="cuda")
    # layer 0 (p = 0) turns ones into 1..L; layer 1 sums that prefix in the order it saw the tokens
    unshuffled = tuple(torch.arange(1, L + 1).cumsum(0).float().tolist())
    trials, seen = 80, []
    for _ in range(trials):
        torch.compiler.cudagraph_mark_step_begin()
        out = compiled(x).clone()  # a replay overwrites the previous output
        seen.append(tuple(out[0, :, 0].tolist()))
        assert torch.equal(out[0], out[1])  # one permutation for the whole batch
    fired = [s for s in seen if s != unshuffled]
    sigma = (trials * 0.25) ** 0.5
    assert abs(len(fired) - trials / 2) <= 4 * sigma, len(fired)
    assert len(set(fired)) >= len(fired) - 1, "the same permutation was replayed"


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


ARGS = ["model=shufflemamba_test", "data=synthetic", "data.img_size=32", "data.num_classes=10",
        "data.train_length=512", "data.val_length=200", "eval_batch_size=64", "regularizer=none",
        "regularizer.shuffle.rate=0.0",  # the eager run's coin is the CPU's, the compiled one's the GPU's
        "precision=bf16", "kernel_backend=fast", "workers=0", "batch_size=128", "accum_steps=1", "clip_grad=3.0",
        "progress=line", "log_every=1", "optimizer.scale_lr=false", "optimizer.base_lr=1e-3",
        "optimizer.schedule.warmup_epochs=0", "optimizer.schedule.min_lr=1e-3", "mlflow.enabled=false", "epochs=2"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_ddp_with_cuda_graphs_trains_like_eager_ddp(tmp_path, torchrun_train):
    torchrun_train(tmp_path, *ARGS, "run_name=eager")
    out = torchrun_train(tmp_path, *ARGS, "run_name=graphs", "compile=reduce-overhead")
    assert "torch.compile mode=reduce-overhead" in out
    runs = tmp_path / "outputs"
    eager = json.loads((runs / "eager" / "final_metrics.json").read_text())
    graphs = json.loads((runs / "graphs" / "final_metrics.json").read_text())
    assert graphs["global_step"] == eager["global_step"] == 4
    assert len(set(graphs["replica_digests"])) == 1  # the gradients were all-reduced: the replicas agree
    for key in ("train/epoch_loss", "val/loss"):
        assert graphs[key] == pytest.approx(eager[key], rel=2e-2), key
    states = {name: torch.load(runs / name / "checkpoints" / "epoch_0002.pth", map_location="cpu",
                               weights_only=True)["model"] for name in ("eager", "graphs")}
    keys = sorted(states["eager"])
    flat = {name: torch.cat([s[k].float().flatten() for k in keys]) for name, s in states.items()}
    error = _rel_l2(flat["graphs"], flat["eager"])
    assert error < 5e-3, f"CUDA-graph DDP weights differ from eager DDP's by rel_l2 {error:.3e}"
