"""Whole models on the CUDA kernels vs the same weights on the exact reference: eval logits and one training
step's gradients, fp32 and bf16 autocast. Skipped without CUDA and the kernels (conftest)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


MODELS = ("vim_tiny", "shufflemamba_reg_tiny")
DEV = "cuda"
BATCH, IMG = 2, 224


def _train_step(model, images, labels, dtype, seed):
    """Forward + backward; the shuffle's draws are re-seeded so both backends see the same permutations."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        logits = model(images)
    loss = F.cross_entropy(logits.float(), labels)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


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
        if dtype == torch.float32:
            check(out_c, out_r, "logits", dtype, None)
        else:
            out_o = m_ref(images)  # fp32 oracle: reference, no autocast
            check(out_c, out_r, "logits", dtype, None)
            check.no_worse_than_reference(out_c, out_r, out_o, "logits", dtype, ceiling=1e-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", MODELS)
def test_training_step_gradients(name, dtype, check, model_pair):
    """Loss and every parameter's gradient after one train-mode step (shuffle active for the Reg model)."""
    m_cuda, m_ref = model_pair(name)
    images = torch.randn(BATCH, 3, IMG, IMG, device=DEV)
    labels = torch.randint(0, 1000, (BATCH,), device=DEV)
    loss_c, g_c = _train_step(m_cuda, images, labels, dtype, seed=123)
    loss_r, g_r = _train_step(m_ref, images, labels, dtype, seed=123)
    assert set(g_c) == set(g_r)
    assert all(g is not None for g in g_c.values())
    flat_c = torch.cat([g.flatten().float() for g in g_c.values()])
    flat_r = torch.cat([g.flatten().float() for g in g_r.values()])
    if dtype == torch.float32:
        check(loss_c, loss_r, "loss", dtype)
        stats = check.record(flat_c, flat_r, "grad_all_params", dtype)
        # Measured on an H200: 5.7e-7 over all parameters, 3.0e-5 for the worst single parameter (an A_b_log).
        assert stats["rel_l2"] <= 1e-5, stats
        worst_name, worst = _worst_param(g_c, g_r)
        check.record(g_c[worst_name], g_r[worst_name], f"grad_worst:{worst_name}", dtype)
        assert worst <= 1e-3, (worst_name, worst)
    else:
        loss_o, g_o = _train_step(m_ref, images, labels, torch.float32, seed=123)
        flat_o = torch.cat([g.flatten().float() for g in g_o.values()])
        check.no_worse_than_reference(loss_c, loss_r, loss_o, "loss", dtype, ceiling=1e-1)
        check.no_worse_than_reference(flat_c, flat_r, flat_o, "grad_all_params", dtype, ceiling=2.5e-1)
        # The parameter whose CUDA gradient is furthest from the fp32 oracle, relative to the reference's own
        # bf16 error on it.
        ratios = {}
        for n in g_o:
            err_c = _rel_l2(g_c[n], g_o[n])
            err_r = _rel_l2(g_r[n], g_o[n])
            ratios[n] = err_c / (err_r + 1e-2)
        worst_name = max(ratios, key=ratios.get)
        check.no_worse_than_reference(g_c[worst_name], g_r[worst_name], g_o[worst_name],
                                      f"grad_worst:{worst_name}", dtype, floor=1e-2)


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _worst_param(g_c: dict, g_r: dict) -> tuple[str, float]:
    errs = {n: _rel_l2(g_c[n], g_r[n]) for n in g_r}
    name = max(errs, key=errs.get)
    return name, errs[name]
