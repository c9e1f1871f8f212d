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


@pytest.mark.parametrize("name", ["vim_test", "shufflemamba_reg_test"])
def test_inference_path_matches_training_path(name, fast_path_on_cpu):
    """Without autograd the fast mixer splits in_proj and writes y over x_f, and blocks add the residual in place:
    the same outputs as with autograd, for the mixer and the whole model (also under bf16 autocast, where blocks
    hand the mixer its input already cast)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, kernel_backend="fast").double().eval()
    mixer = model.layers[1].mixer
    with torch.no_grad():
        mixer.dt_proj_b.bias.normal_(0, 0.5)
        mixer.in_proj.bias = torch.nn.Parameter(torch.randn(mixer.in_proj.out_features, dtype=torch.float64))
    h = torch.randn(2, 19, 64, dtype=torch.float64)
    with_grad = mixer.forward_fast(h)
    assert with_grad.requires_grad
    with torch.no_grad():
        without = mixer.forward_fast(h)
    torch.testing.assert_close(without, with_grad.detach(), rtol=1e-12, atol=1e-12)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    reference = model(x).detach()
    with torch.inference_mode():
        torch.testing.assert_close(model(x), reference, rtol=1e-10, atol=1e-10)
    model.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model(x.float()).detach()
        with torch.no_grad():
            torch.testing.assert_close(model(x.float()), reference, rtol=0, atol=0)


def test_block_adds_the_residual_in_place_only_without_autograd():
    torch.manual_seed(0)
    block = create_model("vim_test", num_classes=5).layers[1].eval()
    hidden, residual = torch.randn(2, 7, 64), torch.randn(2, 7, 64)
    expected = residual + hidden
    out, res = block(hidden, residual.clone())  # autograd on: a new residual
    torch.testing.assert_close(res, expected)
    with torch.no_grad():
        kept = residual.clone()
        out2, res2 = block(hidden, kept)
    assert res2 is kept  # written in place, returned
    torch.testing.assert_close(res2, expected)
    torch.testing.assert_close(out2, out.detach())
    with torch.no_grad():  # a bf16 residual with fp32 hidden states would be promoted: no in-place add then
        low = residual.to(torch.bfloat16)
        block.residual_in_fp32 = False
        _, res3 = block(hidden, low)
    assert res3 is not low and res3.dtype == torch.float32


def test_scan_into_x_writes_the_scan_output_over_x_f():
    torch.manual_seed(0)
    b, L, E, N = 2, 9, 6, 4
    seq = lambda: torch.randn(b, L, E)  # noqa: E731
    ins = [seq(), seq(), -torch.rand(E, N) - 0.5, torch.randn(b, L, N), torch.randn(b, L, N), torch.randn(E),
           torch.randn(E), seq(), seq(), -torch.rand(E, N) - 0.5, torch.randn(b, L, N), torch.randn(b, L, N),
           torch.randn(E), torch.randn(E), seq()]
    expected = ops.bimamba_scan(*ins)
    x_f = ins[0]
    out = ops.bimamba_scan_into_x(*ins)
    assert out is x_f
    torch.testing.assert_close(out, expected)


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd")  # the recording test backend's, harmless
def test_compiled_training_mixer_backward_is_the_fused_graph(fast_path_on_cpu):
    """Under torch.compile the training mixer's backward keeps the one-node design: the scan and conv backward ops
    writing into d_xz, the x_proj dgrads through the opaque in-place `addmm_into` (a traced ``addmm_`` would be
    functionalized into addmm + a copy of dx), no add of two x gradients and no cat of the x / z gradients."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    torch.manual_seed(0)
    mixer = create_model("vim_test", num_classes=5, kernel_backend="fast").layers[1].mixer
    h = torch.randn(2, 19, 64, requires_grad=True)
    backend = AotEagerAndRecordGraphs()
    torch._dynamo.reset()
    compiled = torch.compile(mixer, backend=backend, fullgraph=True)
    compiled(h).square().sum().backward()
    (bw,) = backend.bw_graphs
    # mutating custom ops appear functionalized: auto_functionalized_v2(op, ...)
    targets = [str(n.args[0] if "auto_functionalized" in str(n.target) else n.target)
               for n in bw.graph.nodes if n.op == "call_function"]
    count = lambda name: sum(name in t for t in targets)  # noqa: E731
    assert count("visionmamba.bimamba_scan_bwd_xz") == 1 and count("visionmamba.bimamba_conv_bwd_xz") == 1
    assert count("visionmamba.addmm_into") == 2
    assert count("aten.addmm") == 0 and count("aten.copy") == 0
    assert count("aten.cat") == 2  # the two (B L, R + 2N) d_x_dbl, nothing (B, L, 2E) wide
    grads = {n: p.grad for n, p in mixer.named_parameters()}
    h_grad = h.grad.clone()
    mixer.zero_grad()
    h.grad = None
    mixer(h).square().sum().backward()  # eager: addmm_ directly
    torch.testing.assert_close(h.grad, h_grad)
    for n, p in mixer.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)
