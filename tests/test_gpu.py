"""GPU-only checks (skipped without CUDA): the fast paths on CUDA, in float32 and bf16, through the
flash kernel (ALiBi: compiled FlexAttention), with the cache, and at 32K. .ci/gpu_check.sh runs them."""
import pytest
import torch

from helpers import randn, tiny_gpt
from nanococa.common import parse_scaling
from nanococa.model import ATTENTIONS, KVCache, alibi_slopes, attention, rotary_cos_sin

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("variant", ATTENTIONS)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-4), (torch.bfloat16, 6e-2)])
def test_cuda_fast_path_matches_the_float64_naive_path(variant, dtype, tol):
    shape = (2, 4, 1000, 64)
    q, t, v = randn(shape, 0, torch.float64)
    rot = rotary_cos_sin(3000, 1000, 64, scaling=parse_scaling("dynamic:4"), train_len=512,
                         dtype=torch.float64)
    slopes = alibi_slopes(4).double()
    ref = attention(variant, "naive", q, t, v, rot=rot, slopes=slopes)
    rot_c = tuple(x.cuda().to(dtype) for x in rot)
    got = attention(variant, "fast", *(x.cuda().to(dtype) for x in (q, t, v)), rot=rot_c,
                    slopes=slopes.cuda().to(dtype))
    err = (got.double().cpu() - ref).abs().max() / ref.abs().max()
    assert err < tol, f"relative error {err:.2e}"


@pytest.mark.parametrize("variant", ["rope", "coca", "coca-slack"])
def test_fast_path_runs_on_the_flash_kernel(variant):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, t, v = (x.cuda().to(torch.bfloat16).requires_grad_()
               for x in randn((1, 12, 8192, 64), 1, torch.float32))
    rot = tuple(x.cuda().to(torch.bfloat16) for x in rotary_cos_sin(0, 8192, 64))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if the flash kernel cannot take these inputs
        y = attention(variant, "fast", q, t, v, rot=rot)
        y.float().square().mean().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("variant", ATTENTIONS)
def test_cuda_cache_equals_full_forward(variant):
    model = tiny_gpt(variant, block_size=16).cuda()
    idx = torch.randint(0, 61, (2, 300), device="cuda")
    scaling = parse_scaling("dynamic:4+logn")
    full = model(idx, scaling=scaling)[0]
    cache = KVCache(model.config, 2, 300, "cuda", torch.float32, scaling)
    parts = [model(idx[:, s:s + 64], cache=cache)[0] for s in range(0, 256, 64)]
    parts += [model(idx[:, i:i + 1], cache=cache)[0] for i in range(256, 300)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["coca", "coca-slack", "alibi"])
def test_32k_forward_backward_memory_is_linear(variant):
    shape = (1, 12, 32768, 64)
    q, t, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    rot = tuple(x.cuda().to(torch.bfloat16) for x in rotary_cos_sin(0, 32768, 64))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    attention(variant, "fast", q, t, v, rot=rot,
              slopes=alibi_slopes(12).cuda().to(torch.bfloat16)).sum().backward()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 2 * 2**30, f"peak {peak / 2**30:.2f} GiB; one 32K x 32K bf16 score matrix per head: 24 GiB"


def test_alibi_takes_compiled_flex_attention_on_cuda_and_matches_the_bias_matrix():
    from nanococa.model import alibi_attend, flex_attention
    assert flex_attention is not None
    q, k, v = (x.cuda() for x in randn((2, 8, 1024, 64), 4, torch.float32))
    slopes = alibi_slopes(8).cuda()
    ref = attention("alibi", "naive", q.double(), k.double(), v.double(), slopes=slopes.double())
    got = alibi_attend(q, k, v, slopes)  # Tq == Tk on CUDA: the FlexAttention path
    assert (got.double() - ref).abs().max() < 1e-4
