"""The mixer's (B, L, E) fast path (used by kernel_backend=fast) equals the official-layout path, on CPU through
the pure-PyTorch bidirectional scan: anti-causal conv with the reversed kernel == causal conv on the flipped input."""
import pytest
import torch

from visionmamba import create_model, ops


@pytest.mark.parametrize("name", ["vim_test", "shufflemamba_reg_test"])
def test_fast_layout_matches_official_layout(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5).double()
    mixer = model.layers[1].mixer
    with torch.no_grad():  # non-trivial backward-branch biases so the anti-causal conv really is exercised
        mixer.dt_proj_b.bias.normal_(0, 0.5)
        mixer.conv1d_b.bias.normal_(0, 0.5)
    h = torch.randn(2, 19, 64, dtype=torch.float64, requires_grad=True)
    official = mixer(h)
    fast = mixer.forward_fast(h)
    torch.testing.assert_close(fast, official, rtol=1e-7, atol=1e-7)
    params = [h] + list(mixer.parameters())
    g_official = torch.autograd.grad(official.square().sum(), params)
    g_fast = torch.autograd.grad(fast.square().sum(), params)
    for (name_, _), a, b in zip([("h", h)] + list(mixer.named_parameters()), g_fast, g_official):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name_)


def test_fast_backend_requires_cuda():
    with pytest.raises(ops.KernelUnavailableError, match="CUDA device"):
        ops.resolve_backend("fast", "cpu")


@pytest.fixture
def fast_path_on_cpu(monkeypatch):
    """Let kernel_backend=fast resolve on CPU, where its custom ops run their pure-PyTorch implementations."""
    resolve = ops.resolve_backend
    monkeypatch.setattr(ops, "resolve_backend", lambda req, dev: "fast" if req == "fast" else resolve(req, dev))


def test_whole_model_compiles_to_one_graph_with_shuffle_on(fast_path_on_cpu):
    """torch.compile of the whole training-mode model, shuffle firing, is one graph (custom ops + traced shuffle)."""
    torch.manual_seed(0)
    model = create_model("shufflemamba_test", num_classes=5, kernel_backend="fast", shuffle_rate=1.0,
                         shuffle_schedule="constant").train()
    x = torch.randn(2, 3, 32, 32)
    explained = torch._dynamo.explain(model)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss = compiled(x).logsumexp(-1).sum()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    # with the shuffle off the compiled training forward is the eager one
    model.shuffle.set_rate(0.0)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
