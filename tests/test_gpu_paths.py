"""The code paths a GPU run takes, exercised where torch can run them on a CPU: ALiBi through compiled
FlexAttention, training steps under bf16 and fp16 autocast (fp16 with the gradient scaler), the compiled model
and the fused optimizer. What needs CUDA itself (the flash kernel, CUDA memory figures, FlexAttention's
backward) stays in test_gpu.py."""
import pytest
import torch

from helpers import randn, tiny_gpt, train_micro
from nanococa.model import ATTENTIONS, adamw, alibi_flex, alibi_slopes, attention, flex_attention

# bf16 keeps 8 bits of mantissa, fp16 11: a loss of ~4 nats agrees to about these relative errors
AUTOCAST_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3}


@pytest.mark.slow
@pytest.mark.skipif(flex_attention is None, reason="needs torch.nn.attention.flex_attention (torch >= 2.5)")
@pytest.mark.parametrize("scale", [False, True])
def test_compiled_flex_attention_alibi_equals_the_naive_path(scale):
    """The kernel CUDA runs, compiled as CUDA runs it (about 20 s to compile on 2 cores). Forward only:
    FlexAttention has no backward on CPU, so its gradients are checked on CUDA (test_gpu.py)."""
    q, k, v = randn((2, 4, 256, 32), 11, torch.float32)
    slopes = alibi_slopes(4)
    row_scale = (0.5 + torch.rand(1, 4, 256, 1,
                                  generator=torch.Generator().manual_seed(1))) if scale else None
    got = alibi_flex(q, k, v, slopes, row_scale)  # compiled_flex(): torch.compile(flex_attention)
    ref = attention("alibi", "naive", q.double(), k.double(), v.double(), slopes=slopes.double(),
                    row_scale=None if row_scale is None else row_scale.double())
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def one_step(model, idx, dtype, scaler=None):
    """Loss and gradients of one training step under autocast to dtype (None: float32), as the trainer takes
    it."""
    model.zero_grad(set_to_none=True)
    context = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
    with context:
        _, loss = model(idx, idx)
    (scaler.scale(loss) if scaler else loss).backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    if scaler:
        inv = 1 / scaler.get_scale()
        grads = [g * inv for g in grads]
    return loss.detach().float(), grads


@pytest.mark.parametrize("variant", ["coca", "coca-slack", "rope", "alibi"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_training_step_under_autocast_is_close_to_float32(variant, dtype):
    """Autocast as on a GPU (bf16; fp16 with GradScaler): the loss within AUTOCAST_TOLERANCE of float32, every
    gradient finite and pointing the same way (cosine > 0.99)."""
    model = tiny_gpt(variant, seed=2, vocab_size=97, block_size=64, n_embd=64, n_head=4).train()
    idx = torch.randint(0, 97, (4, 64), generator=torch.Generator().manual_seed(3))
    loss32, grads32 = one_step(model, idx, None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12) if dtype == torch.float16 else None
    loss, grads = one_step(model, idx, dtype, scaler)
    assert abs(loss - loss32) / loss32 < AUTOCAST_TOLERANCE[dtype], (loss, loss32)
    for g, g32 in zip(grads, grads32):
        assert torch.isfinite(g).all()
        cosine = torch.nn.functional.cosine_similarity(g.flatten(), g32.flatten(), dim=0)
        assert cosine > 0.99 or g32.norm() < 1e-6, cosine


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_training_loop_under_autocast_stays_close_to_float32(tmp_path, data_dir, dtype):
    """train.py --dtype as a GPU run uses it (float16: the loop's GradScaler scales, unscales before clipping,
    and skips steps whose gradients overflow): finite losses that follow float32's."""
    steps = ["--max_iters=8", "--eval_interval=8", "--lr_decay_iters=8"]
    ref, _ = train_micro(tmp_path / "f32", data_dir, *steps)
    got, _ = train_micro(tmp_path / dtype, data_dir, *steps, f"--dtype={dtype}")
    assert torch.isfinite(torch.tensor(got["val_loss"]))
    assert abs(got["val_loss"] - ref["val_loss"]) / ref["val_loss"] < 0.03, (got, ref)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["coca", "alibi"])
def test_the_compiled_model_equals_eager_loss_and_gradients(variant):
    """torch.compile as train.py --compile uses it (inductor on the CPU here)."""
    eager = tiny_gpt(variant, seed=4).train()
    compiled = torch.compile(tiny_gpt(variant, seed=4).train())
    idx = torch.randint(0, 61, (2, 32), generator=torch.Generator().manual_seed(5))
    results = []
    for model in (eager, compiled):
        _, loss = model(idx, idx)
        loss.backward()
        results.append((loss.detach(),
                        [p.grad for p in (model._orig_mod if model is compiled else model).parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for g, g_eager in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(g, g_eager, rtol=1e-4, atol=1e-5)


def test_the_fused_optimizer_equals_the_unfused_one():
    """adamw() fuses AdamW on CUDA; torch fuses it on the CPU too, so the same call with device_type="cuda"
    runs the fused kernel here: five steps land on the unfused optimizer's weights."""
    weights = []
    for device_type in ("cpu", "cuda"):
        model = tiny_gpt("coca", seed=6).train()
        opt = adamw(model.parameters(), 0.1, 1e-2, (0.9, 0.95), device_type)
        assert opt.defaults.get("fused") is (True if device_type == "cuda" else None)
        for step in range(5):
            idx = torch.randint(0, 61, (2, 32), generator=torch.Generator().manual_seed(step))
            model(idx, idx)[1].backward()
            opt.step()
            opt.zero_grad()
        weights.append([p.detach() for p in model.parameters()])
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ATTENTIONS)
def test_bf16_fast_paths_stay_close_to_the_float64_naive_path(variant):
    """The attention paths in bf16, as a GPU runs them, against the literal equations in float64."""
    q, t, v = randn((1, 2, 200, 32), 7, torch.float64)
    from nanococa.model import rotary_cos_sin
    rot = rotary_cos_sin(1000, 200, 32, dtype=torch.float64)
    slopes = alibi_slopes(2).double()
    ref = attention(variant, "naive", q, t, v, rot=rot, slopes=slopes)
    got = attention(variant, "fast", *(x.bfloat16() for x in (q, t, v)), rot=tuple(r.bfloat16() for r in rot),
                    slopes=slopes.bfloat16())
    err = (got.double() - ref).abs().max() / ref.abs().max()
    assert err < 6e-2, f"relative error {err:.2e}"
