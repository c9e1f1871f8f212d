"""Stochastic layer-wise shuffle: official probabilities, exact order restoration, eval invariance."""
import pytest
import torch
from torch import nn

from visionmamba import create_model
from visionmamba.layers import LayerwiseShuffle, shuffle_probabilities


class TokenwiseLayer(nn.Module):
    """Permutation-equivariant stand-in for a block: acts on every token independently, records its input."""

    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.seen = None

    def forward(self, hidden, residual):
        self.seen = hidden.detach().clone()
        residual = hidden if residual is None else residual + hidden
        return torch.tanh(self.proj(residual)), residual


def _run_stack(shuffle, layers, x, use_plan=False):
    hidden, residual = x, None
    plan = shuffle.plan(hidden) if use_plan else None
    for i, layer in enumerate(layers):
        hidden, residual = shuffle(i, layer, hidden, residual, plan)
    return hidden, residual


def test_official_probabilities():
    p = shuffle_probabilities(0.5, 24)
    assert p[0] == 0.0 and p[-1] == pytest.approx(0.5)
    assert p[1] == pytest.approx(0.5 / 23) and p[12] == pytest.approx(0.5 * 12 / 23)
    assert shuffle_probabilities(0.3, 4, "constant") == [0.0, 0.3, 0.3, 0.3]
    with pytest.raises(ValueError):
        shuffle_probabilities(0.1, 4, "cosine")
    with pytest.raises(ValueError):
        shuffle_probabilities(1.5, 4)


def test_forced_shuffle_with_equivariant_layers_restores_order():
    torch.manual_seed(0)
    layers = nn.ModuleList(TokenwiseLayer(8) for _ in range(4))
    x = torch.randn(3, 11, 8)
    plain = LayerwiseShuffle(4, 0.0).train()
    forced = LayerwiseShuffle(4, 1.0, "constant").train()  # layers 1..3 always shuffle
    h1, r1 = _run_stack(forced, layers, x)
    seen_shuffled = layers[3].seen  # what layer 3 received inside the shuffled run
    h0, r0 = _run_stack(plain, layers, x)
    seen_plain = layers[3].seen
    torch.testing.assert_close(h1, h0)
    torch.testing.assert_close(r1, r0)
    assert forced.fired == [0, 1, 1, 1]
    # layer 3 really saw a permuted sequence, with one permutation shared by the whole batch
    assert not torch.equal(seen_shuffled, seen_plain)
    perm = [torch.nonzero((seen_plain[0] == row).all(-1)).item() for row in seen_shuffled[0]]
    assert sorted(perm) == list(range(11))
    torch.testing.assert_close(seen_shuffled, seen_plain[:, perm])


def test_shuffle_gradients_are_the_inverse_permutation_of_plain_autograd():
    """The shuffle's custom backward (inverse-permutation gather, no index_add) gives exactly the gradients autograd
    gives for the same permutation applied with plain indexing, for the input, the residual and the layer's weights;
    and a layer that is NOT token-wise (it mixes tokens in order) sees the permuted sequence in its gradient too."""

    class OrderDependentLayer(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.proj = nn.Linear(dim, dim)

        def forward(self, hidden, residual):
            residual = hidden if residual is None else residual + hidden
            mixed = torch.cumsum(self.proj(residual), dim=1) * torch.linspace(0.5, 1.5, residual.shape[1])[:, None]
            return torch.tanh(mixed), residual

    torch.manual_seed(0)
    layer = OrderDependentLayer(6)
    x = torch.randn(2, 9, 6, requires_grad=True)
    r = torch.randn(2, 9, 6, requires_grad=True)
    cotangent = torch.randn(2, 9, 6)
    perm = torch.randperm(9)
    inverse = torch.argsort(perm)
    params = [x, r, layer.proj.weight, layer.proj.bias]

    h, res = LayerwiseShuffle._permuted(perm, layer, x, r)
    grads = torch.autograd.grad((h * cotangent).sum() + (res ** 2).sum(), params)
    h_ref, res_ref = layer(x[:, perm], r[:, perm])  # plain autograd through advanced indexing
    h_ref, res_ref = h_ref[:, inverse], res_ref[:, inverse]
    grads_ref = torch.autograd.grad((h_ref * cotangent).sum() + (res_ref ** 2).sum(), params)

    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)
    # the permutation matters for this layer: without it the output differs
    assert not torch.allclose(h, layer(x, r)[0])


def test_firing_frequency_matches_probabilities():
    torch.manual_seed(1234)
    depth, trials = 6, 4000
    shuffle = LayerwiseShuffle(depth, 0.6).train()
    identity = lambda h, r: (h, h if r is None else r)  # noqa: E731
    x = torch.zeros(1, 4, 2)
    for _ in range(trials):
        _run_stack(shuffle, [identity] * depth, x)
    for p, fired in zip(shuffle.probs, shuffle.fired):
        sigma = (trials * p * (1 - p)) ** 0.5
        assert abs(fired - trials * p) <= 4 * sigma + 1, (p, fired)
    assert shuffle.fired[0] == 0


@pytest.mark.parametrize("name", ["shufflemamba_test", "shufflemamba_reg_test"])
def test_eval_is_deterministic_and_identical_with_shuffle_on_or_off(name):
    torch.manual_seed(0)
    on = create_model(name, shuffle_rate=1.0, num_classes=4)
    off = create_model(name, shuffle_rate=0.0, num_classes=4)
    off.load_state_dict(on.state_dict())
    x = torch.randn(2, 3, 32, 32)
    on.eval(), off.eval()
    with torch.no_grad():
        a, b, c = on(x), on(x), off(x)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert sum(on.shuffle.fired) == 0


def test_rate_zero_in_training_equals_no_shuffle_and_forced_shuffle_changes_the_scan():
    torch.manual_seed(0)
    model = create_model("shufflemamba_test", shuffle_rate=0.0, num_classes=4)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.eval()
        reference = model(x)
        model.train()  # no drop path/dropout in this model: training == eval unless the shuffle fires
        torch.testing.assert_close(model(x), reference)
        model.shuffle.set_rate(1.0, "constant")
        shuffled = model(x)
    assert sum(model.shuffle.fired) == model.depth - 1
    assert not torch.allclose(shuffled, reference), "the SSM scan must see the permuted order"


def test_shuffle_module_has_no_state():
    model = create_model("shufflemamba_test")
    assert not any(k.startswith("shuffle") for k in model.state_dict())


@pytest.mark.parametrize("use_plan", [False, True], ids=["per_layer_draws", "plan"])
def test_traced_shuffle_restores_order_and_fires_at_the_layer_probability(use_plan):
    """Under torch.compile the coin is drawn on the device and the permutation applied branch-free: a firing layer
    sees one batch-shared permutation, the output is in the original order, and layer i fires with p_i; the same with
    every layer's draws taken at once (`plan`, what the models do)."""
    torch.manual_seed(0)
    layers = nn.ModuleList(TokenwiseLayer(8) for _ in range(2))
    shuffle = LayerwiseShuffle(2, 0.5).train()  # p = [0, 0.5]
    x = torch.randn(3, 11, 8)
    plain_h, plain_r = _run_stack(LayerwiseShuffle(2, 0.0).train(), layers, x)
    seen_plain = layers[1].seen
    assert shuffle.plan(x) is None  # eager: the host-side coins decide, layer by layer
    compiled = torch.compile(lambda inp: _run_stack(shuffle, layers, inp, use_plan), backend="aot_eager",
                             fullgraph=True)
    trials, fired = 300, 0
    for _ in range(trials):
        h, r = compiled(x)
        torch.testing.assert_close(h, plain_h)
        torch.testing.assert_close(r, plain_r)
        seen = layers[1].seen
        if not torch.equal(seen, seen_plain):
            fired += 1
            perm = [torch.nonzero((seen_plain[0] == row).all(-1)).item() for row in seen[0]]
            torch.testing.assert_close(seen, seen_plain[:, perm])  # one permutation for the whole batch
        assert torch.equal(layers[0].seen, x)  # p_0 = 0: never shuffled
    sigma = (trials * 0.25) ** 0.5
    assert abs(fired - trials * 0.5) <= 4 * sigma, fired
