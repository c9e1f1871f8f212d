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
