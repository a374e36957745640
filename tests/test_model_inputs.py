"""The model's input edge: one image at a time, a last batch of one, bad dtypes/shapes, non-finite values.

Comparisons between a batch of one and row 0 of a larger batch run in float64: the two routes sum in
different orders, and in float32 a membrane potential at the threshold could land on either side.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

import spikingformer as sf
from spikingformer.engine.distributed import Runtime
from spikingformer.engine.trainer import evaluate, make_loader
from spikingformer.models import NonFiniteInputError, check_finite

TINY = dict(embed_dim=32, depth=1, num_heads=2, time_steps=2, num_classes=10)
# one zoo entry per family and arch: CIFAR, ImageNet, event, digits
MODELS = [f"{arch}_{size}" for arch in ("spikingformer", "spikformer")
          for size in ("cifar10_4_256", "8_384", "dvs128_2_256", "digits")]


def tiny_model(name: str) -> sf.SpikingTransformer:
    torch.manual_seed(0)
    return sf.create_model(name, **TINY).double()


def inputs(model: sf.SpikingTransformer, batch: int, static: bool) -> torch.Tensor:
    """Random images (B, C, 32, 32) or Poisson event frames (B, 3, C, 32, 32), float64."""
    c = model.config
    g = torch.Generator().manual_seed(1)
    if static:
        return torch.randn(batch, c.in_channels, 32, 32, generator=g, dtype=torch.float64) * 2
    return torch.poisson(torch.full((batch, 3, c.in_channels, 32, 32), 1.0, dtype=torch.float64), generator=g)


def calibrate(model: sf.SpikingTransformer, x: torch.Tensor) -> None:
    """A few training-mode passes, so the running BN statistics make neurons fire in eval mode."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average: exact batch statistics after these passes
    with torch.no_grad():
        for _ in range(2):
            model(x)


# static (4-D) input for every model; event models also take event frames (5-D)
MODEL_FORMS = [(name, form) for name in MODELS for form in (("static", "events") if "dvs" in name else ("static",))]


@pytest.mark.parametrize("name, form", MODEL_FORMS, ids=[f"{n}-{f}" for n, f in MODEL_FORMS])
@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode"])
def test_batch_of_one_equals_row_0_in_eval_mode(name, form, grad_mode):
    model = tiny_model(name)
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[grad_mode]
    x = inputs(model, 3, static=form == "static")
    calibrate(model, x)
    model.eval()
    with context():
        batch = model(x)
        one = model(x[:1])
        head, tail = model(x[:2]), model(x[2:])  # batches of 2 and 1, as a loader's last batch
    assert one.shape == (1, 10)
    torch.testing.assert_close(one[0], batch[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.cat([head, tail]), batch, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(batch[0], batch[1]), "different images should give different logits"


@pytest.mark.parametrize("name", MODELS)
def test_batch_of_one_in_train_mode_matches_repeated_frames(name):
    """Training mode normalises with the batch's statistics, so a batch of one is compared with the
    same image fed as event-style frames repeated over T (the tokenizer's other route)."""
    model = tiny_model(name).train()
    x = inputs(model, 1, static=True)
    frames = x.unsqueeze(1).expand(-1, model.config.time_steps, -1, -1, -1)
    for context in (torch.no_grad, torch.enable_grad):
        with context():
            a = model(x)
            b = model(frames)
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    a.sum().backward()
    assert model.tokenizer.stages[0].conv.weight.grad is not None


def test_evaluation_with_a_last_batch_of_one():
    """``evaluate`` over 5 images in batches of 2 (2, 2, 1) and of 1 gives the metrics of one batch of 5."""
    model = tiny_model("spikingformer_digits")
    x = inputs(model, 5, static=True).float()  # float32 images into a float64 model: cast at the input
    calibrate(model, x.double())
    data = TensorDataset(x, torch.tensor([0, 1, 2, 3, 4]))
    runtime = Runtime(device=torch.device("cpu"))
    results = [evaluate(model, make_loader(data, bs, False, runtime, 0, 0), runtime, None) for bs in (5, 2, 1)]
    for r in results[1:]:
        assert r["samples"] == 5 and r["top1"] == results[0]["top1"] and r["top5"] == results[0]["top5"]
        assert r["loss"] == pytest.approx(results[0]["loss"], rel=1e-6)  # summed in float32


def test_another_float_dtype_is_cast_to_the_weights():
    model = sf.create_model("spikingformer_digits", **TINY).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x.double()), model(x))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool], ids=str)
def test_non_float_input_is_refused(dtype):
    model = sf.create_model("spikingformer_digits", **TINY).eval()
    with pytest.raises(ValueError, match=rf"floating-point input \(torch.float32.*got {dtype}"):
        model(torch.randn(2, 1, 16, 16).to(dtype))


BAD_SHAPES = [
    ("static", (0, 1, 16, 16), r"empty input of shape \(0, 1, 16, 16\).*B >= 1"),
    ("event", (2, 0, 2, 32, 32), r"empty input.*T >= 1"),
    ("static", (1, 16, 16), r"static images \(B, 1, H, W\).*got shape \(1, 16, 16\).*unsqueeze\(0\)"),
    # grey images without their channel dimension, as the digits come (B, H, W), or one alone (H, W)
    ("static", (2, 16, 16), r"got shape \(2, 16, 16\) \(add the channel dimension with x.unsqueeze\(1\) for a batch of "
                            r"grey images, or the batch dimension with x.unsqueeze\(0\) for a single sample\)"),
    ("static", (16, 16), r"got shape \(16, 16\) \(add the batch and channel dimensions with x\[None, None\] for a single grey"),
    ("event", (2, 32, 32), r"got shape \(2, 32, 32\) \(add the batch dimension with x.unsqueeze\(0\) for a single sample\)"),
    ("static", (2, 3, 16, 16), r"1 input channels, got 3"),
    ("event", (2, 2, 32, 32, 3), r"2 input channels, got 32 .*read as event frames \(B, T, C, H, W\)"),
    ("event", (2, 2, 8, 32, 32), r"2 input channels, got 8 .*event frames \(B, T, 2, H, W\)"),
    ("static", (2, 1, 18, 16), r"18x16 must be a positive multiple of the tokenizer stride 4"),
    ("static", (2, 1, 0, 16), r"0x16 must be a positive multiple"),
    ("static", (2, 1, 16, 16, 16, 16), r"got shape \(2, 1, 16, 16, 16, 16\)"),
]


@pytest.mark.parametrize("kind, shape, message", BAD_SHAPES, ids=[f"{k}-{'x'.join(map(str, s))}" for k, s, _ in BAD_SHAPES])
@pytest.mark.parametrize("route", ["forward", "check_input"])
def test_bad_input_shape_is_refused(kind, shape, message, route):
    model = sf.create_model({"static": "spikingformer_digits", "event": "spikingformer_digits_dvs"}[kind], **TINY)
    check = model if route == "forward" else model.check_input
    with pytest.raises(ValueError, match=message):
        check(torch.randn(shape))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_reported_by_check_input(value):
    model = sf.create_model("spikingformer_digits", **TINY).eval()
    x = torch.randn(4, 1, 16, 16)
    model.check_input(x)  # finite: no error
    bad = x.clone()
    bad[1] = value
    bad[3, 0, 2, 2] = value
    with pytest.raises(NonFiniteInputError, match=r"input holds NaN or infinite values \(samples 1, 3 of the batch\)"):
        model.check_input(bad)


def test_check_finite_names_what_it_checks():
    bad = torch.zeros(2, 3)
    bad[0, 1] = float("nan")
    with pytest.raises(NonFiniteInputError, match=r"^my batch holds"):
        check_finite(bad, "my batch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_check_finite_checks_by_a_sum_and_passes_finite_values_whose_sum_overflows(dtype):
    """The check sums the values (one pass; a NaN or an infinity makes the sum so) and looks at them
    one by one only when the sum is not finite: finite values whose sum overflows pass, 16-bit
    inputs are summed in float32 (65504 ones in float16 would overflow), and a single NaN or
    infinity anywhere, or infinities of both signs, are found."""
    top = torch.finfo(dtype).max
    check_finite(torch.full((4, 3), top / 2, dtype=dtype))  # the sum overflows; every value is finite
    check_finite(torch.ones(70000, dtype=dtype).view(7, 10000))
    for values in ([float("nan")], [float("inf")], [float("inf"), -float("inf")]):
        bad = torch.zeros(5, 7, dtype=dtype)
        for i, v in enumerate(values):
            bad[2 + i, 3] = v
        rows = ", ".join(str(2 + i) for i in range(len(values)))
        with pytest.raises(NonFiniteInputError, match=rf"\(samples {rows} of the batch\)"):
            check_finite(bad)


def test_forward_alone_reads_a_nan_image_as_all_zero():
    """What forward without ``check_input`` does with NaN (documented)."""
    model = sf.create_model("spikingformer_digits", **TINY).eval()
    x = torch.zeros(4, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(torch.full_like(x, float("nan"))), model(x))
