"""VMamba / LocalVim / LocalVMamba on the CUDA kernels vs the same weights on the exact reference: the grouped
(multi-direction) selective scan, eval logits (fp32, bf16 autocast) and one training step's loss and gradients.
MambaOut has no selective scan (kernel_backend is ignored), so it has nothing to compare here.
Skipped without CUDA and the kernels (tests/gpu/conftest.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from visionmamba import ops

MODELS = ("vmamba_tiny", "local_vim_tiny", "local_vmamba_tiny")
DEV = "cuda"
BATCH, IMG = 2, 224


def _scan_inputs(groups: int, d_state: int, with_z: bool, dtype: torch.dtype) -> dict:
    """Leaf tensors for one grouped scan; u, delta, B, C, z in ``dtype`` (as a mixer passes them), A, D, bias fp32."""
    torch.manual_seed(0)
    b, e, length = 2, groups * 48, 300
    x = dict(u=torch.randn(b, e, length), delta=0.5 * torch.randn(b, e, length), A=-torch.rand(e, d_state) - 0.5,
             B=torch.randn(b, groups, d_state, length), C=torch.randn(b, groups, d_state, length),
             D=torch.randn(e), z=torch.randn(b, e, length) if with_z else None, delta_bias=0.1 * torch.randn(e))
    low = ("u", "delta", "B", "C", "z")
    return {k: None if v is None else v.to(DEV, dtype if k in low else torch.float32).requires_grad_()
            for k, v in x.items()}


def _scan_and_grads(inputs: dict, backend: str):
    y = ops.selective_scan(**inputs, delta_softplus=True, backend=backend)
    leaves = {k: v for k, v in inputs.items() if v is not None}
    grads = torch.autograd.grad(y.float().square().sum(), list(leaves.values()))
    return y, dict(zip(leaves, grads))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("groups,d_state,with_z", [(4, 1, False), (4, 16, True)], ids=["vmamba", "local"])
def test_grouped_selective_scan(groups, d_state, with_z, dtype, check):
    """B, C of shape (b, G, N, L): channel block g uses group g (the VMamba/LocalMamba one-call layout)."""
    inputs = _scan_inputs(groups, d_state, with_z, dtype)
    y_c, g_c = _scan_and_grads(inputs, "cuda")
    y_r, g_r = _scan_and_grads(inputs, "ref")
    seqlen = inputs["u"].shape[-1]
    if dtype == torch.float32:
        check(y_c, y_r, "y", dtype, seqlen)
        for k in g_r:
            check(g_c[k], g_r[k], f"d{k}", dtype, seqlen)
    else:
        # fp32 oracle on the same (bf16-rounded) values
        oracle = {k: None if v is None else v.detach().float().requires_grad_() for k, v in inputs.items()}
        y_o, g_o = _scan_and_grads(oracle, "ref")
        check.no_worse_than_reference(y_c, y_r, y_o, "y", dtype, seqlen, ceiling=5e-2)
        for k in g_r:
            check.no_worse_than_reference(g_c[k], g_r[k], g_o[k], f"d{k}", dtype, seqlen, floor=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", MODELS)
def test_eval_logits(name, dtype, check, model_pair):
    m_cuda, m_ref = model_pair(name)
    m_cuda.eval()
    m_ref.eval()
    images = torch.randn(BATCH, 3, IMG, IMG, device=DEV)
    with torch.no_grad():
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out_c, out_r = m_cuda(images), m_ref(images)
        assert torch.isfinite(out_c).all()
        if dtype == torch.float32:
            check(out_c, out_r, "logits", dtype)
        else:
            out_o = m_ref(images)  # fp32 oracle: reference, no autocast
            check.no_worse_than_reference(out_c, out_r, out_o, "logits", dtype, ceiling=1e-1)


def _train_step(model, images, labels, seed):
    """Forward + backward; re-seeded so both backends draw the same drop-path masks."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = F.cross_entropy(model(images).float(), labels)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("name", MODELS)
def test_training_step_gradients(name, check, model_pair):
    m_cuda, m_ref = model_pair(name)
    images = torch.randn(BATCH, 3, IMG, IMG, device=DEV)
    labels = torch.randint(0, 1000, (BATCH,), device=DEV)
    loss_c, g_c = _train_step(m_cuda, images, labels, seed=123)
    loss_r, g_r = _train_step(m_ref, images, labels, seed=123)
    assert set(g_c) == set(g_r) and all(g is not None for g in g_c.values())
    check(loss_c, loss_r, "loss", torch.float32)
    flat_c = torch.cat([g.flatten() for g in g_c.values()])
    flat_r = torch.cat([g.flatten() for g in g_r.values()])
    stats = check.record(flat_c, flat_r, "grad_all_params", torch.float32)
    assert stats["rel_l2"] <= 1e-3, stats
    errs = {n: _rel_l2(g_c[n], g_r[n]) for n in g_r}
    worst = max(errs, key=errs.get)
    check.record(g_c[worst], g_r[worst], f"grad_worst:{worst}", torch.float32)
    assert errs[worst] <= 1e-2, (worst, errs[worst])
