"""Tests of visionmamba.optim: weight-decay groups, LR scaling, optimizer factory and the LR schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from visionmamba.optim import (LRScheduler, align_optimizer_state, build_optimizer, build_scheduler, largest_first,
                               param_groups, scale_lr)


class TinyMixer(nn.Module):
    """Parameter names, shapes and metadata of a bidirectional Mamba mixer (Vim naming)."""

    def __init__(self, dim: int = 4, d_state: int = 2) -> None:
        super().__init__()
        self.in_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.conv1d = nn.Conv1d(dim, dim, kernel_size=4, groups=dim)  # weight (D, 1, K), bias (D,)
        self.x_proj = nn.Linear(dim, 5, bias=False)
        self.dt_proj = nn.Linear(1, dim)
        self.A_log = nn.Parameter(torch.zeros(dim, d_state))  # (D, N)
        self.D = nn.Parameter(torch.ones(dim))  # (D,)
        self.A_b_log = nn.Parameter(torch.zeros(dim, d_state))
        # mamba_ssm's convention; timm 0.4.12 (official) ignores it.
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self.A_b_log._no_weight_decay = True


class TinyVim(nn.Module):
    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, 2, dim))  # not listed in no_weight_decay()
        self.layers = nn.ModuleList([nn.ModuleDict({"mixer": TinyMixer(dim)})])
        self.norm_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)
        self.frozen = nn.Parameter(torch.ones(2, 2), requires_grad=False)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}


ALWAYS_DECAYED = {
    "layers.0.mixer.in_proj.weight",
    "layers.0.mixer.conv1d.weight",
    "layers.0.mixer.x_proj.weight",
    "layers.0.mixer.dt_proj.weight",
    "head.weight",
}
NEVER_DECAYED = {
    "cls_token",
    "pos_embed",
    "layers.0.mixer.conv1d.bias",
    "layers.0.mixer.dt_proj.bias",
    "layers.0.mixer.D",
    "norm_f.weight",
    "norm_f.bias",
    "head.bias",
}
MARKED_OR_TOKENS = {"layers.0.mixer.A_log", "layers.0.mixer.A_b_log", "register_tokens"}


def _split(groups: list[dict]) -> tuple[set[str], set[str]]:
    no_decay = {n for g in groups if g["weight_decay"] == 0.0 for n in g["param_names"]}
    decay = {n for g in groups if g["weight_decay"] > 0.0 for n in g["param_names"]}
    return no_decay, decay


def test_official_decay_mode_reproduces_timm_0_4_12():
    groups = param_groups(TinyVim(), 0.05, decay_mode="official")
    assert [g["weight_decay"] for g in groups] == [0.0, 0.05]  # timm order: no-decay first
    no_decay, decay = _split(groups)
    assert no_decay == NEVER_DECAYED
    assert decay == ALWAYS_DECAYED | MARKED_OR_TOKENS  # A_log / A_b_log (2-D) and registers decay
    for group in groups:
        assert len(group["params"]) == len(group["param_names"])


def test_modern_decay_mode_exempts_mamba_and_token_params():
    no_decay, decay = _split(param_groups(TinyVim(), 0.1))
    assert decay == ALWAYS_DECAYED
    assert no_decay == NEVER_DECAYED | MARKED_OR_TOKENS
    assert "frozen" not in no_decay | decay


def test_unknown_decay_mode():
    with pytest.raises(ValueError, match="decay_mode 'none'"):
        param_groups(TinyVim(), 0.1, decay_mode="none")


@pytest.mark.parametrize(("decay_mode", "a_log_decays"), [("official", True), ("modern", False)])
def test_adamw_step_applies_decay_only_to_decay_group(decay_mode, a_log_decays):
    model = TinyVim()
    for p in model.parameters():
        nn.init.constant_(p, 1.0)
    lr, wd = 0.1, 0.5
    optimizer = build_optimizer(model, lr=lr, weight_decay=wd, decay_mode=decay_mode)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # only decoupled weight decay moves parameters
    optimizer.step()
    shrunk = 1.0 - lr * wd
    assert model.layers[0]["mixer"].A_log.detach().mean().item() == pytest.approx(shrunk if a_log_decays else 1.0)
    assert model.layers[0]["mixer"].conv1d.weight.detach().mean().item() == pytest.approx(shrunk)
    assert model.layers[0]["mixer"].D.detach().mean().item() == pytest.approx(1.0)
    assert model.pos_embed.detach().mean().item() == pytest.approx(1.0)


def test_build_optimizer_settings():
    model = TinyVim()
    optimizer = build_optimizer(model, lr=2e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.1]
    assert all(g["lr"] == 2e-3 and g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8 for g in optimizer.param_groups)
    num_trainable = sum(p.requires_grad for p in model.parameters())
    assert sum(len(g["params"]) for g in optimizer.param_groups) == num_trainable
    saved_names = [g["param_names"] for g in optimizer.state_dict()["param_groups"]]
    assert "layers.0.mixer.A_log" in saved_names[0]

    sgd = build_optimizer(model, name="SGD", lr=0.1)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["momentum"] == 0.9 and sgd.param_groups[0]["nesterov"]
    with pytest.raises(ValueError, match="Unknown optimizer 'lamb'; valid names are adamw, sgd"):
        build_optimizer(model, name="lamb", lr=0.1)


def test_build_optimizer_orders_each_group_largest_first():
    model = TinyVim()
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    by_name = dict(model.named_parameters())
    groups = param_groups(model, 0.1)
    for group, reference in zip(optimizer.param_groups, groups):
        sizes = [p.numel() for p in group["params"]]
        assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
        assert sorted(group["param_names"]) == sorted(reference["param_names"])  # the same split, reordered
        assert all(by_name[n] is p for n, p in zip(group["param_names"], group["params"]))  # names follow params
    assert largest_first([torch.zeros(2), torch.zeros(5), torch.zeros(2), torch.zeros(7)]) == [3, 1, 0, 2]


def test_optimizer_state_saved_in_another_order_is_restored_by_name():
    """A checkpoint written before parameters were ordered largest first (model order) resumes with each moment on
    its own parameter: PyTorch alone would load them by position."""
    torch.manual_seed(0)
    model = TinyVim()
    old = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, weight_decay=0.1)  # model order, as before
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    old.step()
    saved = old.state_dict()
    expected = {name: old.state[p]["exp_avg"].clone() for g in old.param_groups
                for name, p in zip(g["param_names"], g["params"])}

    new = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    assert [g["param_names"] for g in new.param_groups] != [g["param_names"] for g in saved["param_groups"]]
    new.load_state_dict(align_optimizer_state(saved, new))
    for g in new.param_groups:
        for name, p in zip(g["param_names"], g["params"]):
            torch.testing.assert_close(new.state[p]["exp_avg"], expected[name], rtol=0, atol=0)
    assert align_optimizer_state(new.state_dict(), new)["param_groups"] == new.state_dict()["param_groups"]


def test_scale_lr_deit_rule():
    assert scale_lr(5e-4, 256 * 8) == pytest.approx(2e-3)  # ShuffleMamba-B: 256/GPU x 8 GPUs
    assert scale_lr(5e-4, 128 * 1 * 8) == pytest.approx(1e-3)  # Vim-T
    assert scale_lr(5e-4, 64 * 2 * 8) == pytest.approx(1e-3)  # gradient accumulation counts
    assert scale_lr(1e-5, 64 * 8) == pytest.approx(1e-5)
    assert scale_lr(1e-3, 256, base_batch=256) == pytest.approx(1e-3)


# ---------------------------------------------------------------------------------------------------- schedule

LR, WARMUP_LR, MIN_LR = 1e-3, 1e-6, 1e-5


def _expected(t: float, warmup_t: float, total_t: float) -> float:
    """Hand-written schedule: linear warmup from WARMUP_LR, then cosine counted from t = 0."""
    if t < warmup_t:
        return WARMUP_LR + t * (LR - WARMUP_LR) / warmup_t
    if t >= total_t:
        return MIN_LR
    return MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi * t / total_t))


def _optimizer() -> torch.optim.Optimizer:
    return build_optimizer(TinyVim(), lr=LR, weight_decay=0.05)


def _epoch_lrs(scheduler: LRScheduler, optimizer: torch.optim.Optimizer, epochs: int) -> list[float]:
    """The lr each epoch runs at, driving the hooks as the training loop does."""
    lrs = []
    for epoch in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        assert len({g["lr"] for g in optimizer.param_groups}) == 1  # both groups share the schedule
        for step in range(3):
            scheduler.after_optimizer_step(epoch * 3 + step + 1)  # no effect per epoch
            assert optimizer.param_groups[0]["lr"] == lrs[-1]
        scheduler.after_epoch(epoch)
    return lrs


def test_epoch_schedule_values():
    optimizer = _optimizer()
    scheduler = build_scheduler(optimizer, epochs=10, steps_per_epoch=3, warmup_epochs=3, warmup_lr=WARMUP_LR,
                                min_lr=MIN_LR)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(WARMUP_LR)  # set at construction
    lrs = _epoch_lrs(scheduler, optimizer, 12)
    expected = [_expected(k, 3, 10) for k in range(12)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[1] == pytest.approx(WARMUP_LR + (LR - WARMUP_LR) / 3)
    assert lrs[5] == pytest.approx(MIN_LR + 0.5 * (LR - MIN_LR))  # cos(pi / 2) = 0
    assert lrs[10:] == pytest.approx([MIN_LR, MIN_LR])


def test_official_epoch_shift():
    optimizer = _optimizer()
    scheduler = build_scheduler(optimizer, epochs=10, steps_per_epoch=3, warmup_epochs=3, warmup_lr=WARMUP_LR,
                                min_lr=MIN_LR, official_epoch_shift=True)
    lrs = _epoch_lrs(scheduler, optimizer, 10)
    assert lrs[0] == lrs[1] == pytest.approx(WARMUP_LR)
    assert lrs[1:] == pytest.approx([_expected(k - 1, 3, 10) for k in range(1, 10)], rel=1e-12)


def test_no_warmup_starts_at_peak():
    optimizer = _optimizer()
    build_scheduler(optimizer, epochs=10, steps_per_epoch=3, warmup_epochs=0, min_lr=MIN_LR)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(LR)


def test_step_schedule_values():
    optimizer = _optimizer()
    scheduler = build_scheduler(optimizer, epochs=3, steps_per_epoch=4, warmup_epochs=1, warmup_lr=WARMUP_LR,
                                min_lr=MIN_LR, interval="step")
    lrs = []
    for epoch in range(3):
        for step in range(4):
            lrs.append(optimizer.param_groups[0]["lr"])
            scheduler.after_optimizer_step(epoch * 4 + step + 1)
        before = optimizer.param_groups[0]["lr"]
        scheduler.after_epoch(epoch)
        assert optimizer.param_groups[0]["lr"] == before  # epoch hook is inert per step
    assert lrs == pytest.approx([_expected(s, 4, 12) for s in range(12)], rel=1e-12)
    assert lrs[2] == pytest.approx(WARMUP_LR + 2 * (LR - WARMUP_LR) / 4)


def test_shufflemamba_peak_after_long_warmup():
    optimizer = build_optimizer(TinyVim(), lr=2e-3, weight_decay=0.1)
    scheduler = build_scheduler(optimizer, epochs=300, steps_per_epoch=625, warmup_epochs=30, warmup_lr=5e-7,
                                min_lr=5e-6)
    assert scheduler.lr_at(30) / 2e-3 == pytest.approx(0.976, abs=1e-3)  # cosine counted from t = 0


def test_state_dict_round_trip_restores_lr():
    optimizer = _optimizer()
    scheduler = build_scheduler(optimizer, epochs=10, steps_per_epoch=3, warmup_epochs=3, warmup_lr=WARMUP_LR,
                                min_lr=MIN_LR, official_epoch_shift=True)
    _epoch_lrs(scheduler, optimizer, 6)
    saved_lr = optimizer.param_groups[0]["lr"]
    state = scheduler.state_dict()

    resumed_optimizer = _optimizer()  # fresh optimizer: the scheduler alone restores the lr
    resumed = build_scheduler(resumed_optimizer, epochs=10, steps_per_epoch=3, warmup_epochs=3, warmup_lr=WARMUP_LR,
                              min_lr=MIN_LR, official_epoch_shift=True)
    resumed.load_state_dict(state)
    assert resumed.get_last_lr() == pytest.approx([saved_lr, saved_lr])
    assert saved_lr == pytest.approx(_expected(5, 3, 10))  # epoch 6 runs at f(5) with the shift

    mismatched = build_scheduler(_optimizer(), epochs=10, steps_per_epoch=3, interval="step")
    with pytest.raises(ValueError, match="interval"):
        mismatched.load_state_dict(state)


def test_scheduler_argument_errors():
    with pytest.raises(ValueError, match="needs interval='epoch'"):
        build_scheduler(_optimizer(), epochs=10, steps_per_epoch=3, interval="step", official_epoch_shift=True)
    with pytest.raises(ValueError, match="Unknown interval 'iter'"):
        build_scheduler(_optimizer(), epochs=10, steps_per_epoch=3, interval="iter")
    with pytest.raises(ValueError, match="warmup_epochs"):
        build_scheduler(_optimizer(), epochs=3, steps_per_epoch=3, warmup_epochs=-1)


def test_warmup_longer_than_run():
    optimizer = _optimizer()
    scheduler = build_scheduler(optimizer, epochs=2, steps_per_epoch=3, warmup_epochs=5, warmup_lr=WARMUP_LR,
                                min_lr=MIN_LR)
    assert _epoch_lrs(scheduler, optimizer, 2) == pytest.approx([_expected(k, 5, 2) for k in range(2)], rel=1e-12)
