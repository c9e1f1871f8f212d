"""Whole models with kernel_backend=fast (Triton bidirectional scan) against the ref backend on the GPU."""
import pytest
import torch



@pytest.fixture(autouse=True)
def _require_cuda():  # the fast path needs CUDA + triton only, not mamba-ssm
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pytest.importorskip("triton")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.mark.parametrize("name", ["vim_tiny", "shufflemamba_reg_tiny"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_logits_match_ref(name, dtype, check, model_pair):
    fast, ref = model_pair(name, "fast")
    fast.eval(), ref.eval()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        check(fast(x).float(), ref(x).float(), f"{name}:logits", dtype, seqlen=197, scale=2.0)


def test_fast_train_step_gradients_match_ref(check, model_pair):
    fast, ref = model_pair("vim_tiny", "fast")
    x = torch.randn(2, 3, 224, 224, device="cuda")
    target = torch.randint(0, 1000, (2,), device="cuda")
    for model in (fast, ref):
        torch.nn.functional.cross_entropy(model(x), target).backward()
    for (name, p_fast), p_ref in zip(fast.named_parameters(), ref.parameters()):
        check(p_fast.grad, p_ref.grad, f"grad:{name}", torch.float32, seqlen=197, scale=10.0)


def test_whole_model_compiles_to_one_graph_and_matches_eager(check):
    """torch.compile (inductor) of a whole training-mode ShuffleMamba on the fast kernels, the shuffle firing in every
    layer: one graph, no breaks; with the shuffle off, loss and gradients equal the eager model's."""
    from visionmamba import create_model

    torch.manual_seed(0)
    model = create_model("shufflemamba_tiny", kernel_backend="fast", shuffle_rate=1.0,
                         shuffle_schedule="constant").cuda().train()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    target = torch.randint(0, 1000, (4,), device="cuda")
    explained = torch._dynamo.explain(model)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    compiled = torch.compile(model, fullgraph=True)
    torch.nn.functional.cross_entropy(compiled(x), target).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.zero_grad(set_to_none=True)
    model.shuffle.set_rate(0.0)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    loss_c = torch.nn.functional.cross_entropy(compiled(x), target)
    loss_c.backward()
    grads_c = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    loss_e = torch.nn.functional.cross_entropy(model(x), target)
    loss_e.backward()
    check(loss_c, loss_e, "loss_compiled_vs_eager", torch.float32, seqlen=197, scale=10.0)
    for (name, p), g_c in zip(model.named_parameters(), grads_c):
        check(g_c, p.grad, f"grad_compiled:{name}", torch.float32, seqlen=197, scale=10.0)
