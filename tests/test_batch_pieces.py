"""The ``batch_pieces`` route: in inference the tokenizer runs on pieces of the batch, each piece's
stem output at most ``batch_pieces.PIECE_BYTES``, and joins their tokens.

Samples are independent in inference (BatchNorm with running statistics, the neuron per sample),
so the pieces must give the tokens of the whole batch: exactly in float64 (PyTorch's own
convolution, per image), and in float32 up to a convolution that may sum in another order for a
smaller batch (a bounded share of tokens may differ, where a membrane lies within rounding of a
threshold). Where pieces could change the result or what an observer sees (training-mode
BatchNorm, autograd, hooks), the route steps aside.
"""

from __future__ import annotations

import pytest
import torch

from spikingformer.layers import batch_pieces, routes
from spikingformer.models.zoo import create_model


def _event_model(dtype=torch.float32):
    torch.manual_seed(0)
    model = create_model("spikingformer_cifar10dvs_2_256", depth=1, time_steps=3, img_size=32).to(dtype).eval()
    x = torch.poisson(torch.full((5, 3, 2, 32, 32), 0.6)).to(dtype)
    return model, x


def _tokens(model, x, spec, piece_elements, monkeypatch, grad=False):
    """The tokenizer's output under ``spec`` with pieces of at most ``piece_elements`` stem-output
    elements of x's dtype, and how many stem convolutions ran."""
    monkeypatch.setattr(batch_pieces, "PIECE_BYTES", piece_elements * x.element_size())
    calls = []
    stem = model.tokenizer.stages[0]
    real = stem.convolve
    monkeypatch.setattr(stem, "convolve", lambda part: calls.append(part.shape) or real(part))
    with routes.configured(spec), torch.set_grad_enabled(grad):
        out = model.forward_features(x)
    monkeypatch.setattr(stem, "convolve", real)
    return out, calls


def test_event_pieces_equal_the_whole_batch_in_float64(monkeypatch):
    """Stem outputs of 3 x 5 x 32 x 32 x 32 elements, at most 2 images' worth per piece: 3 pieces
    (2, 2, 1 samples), and the same tokens bit for bit."""
    model, x = _event_model(torch.float64)
    per_image = 3 * 32 * 32 * 32
    whole, calls = _tokens(model, x, "-batch_pieces", 2 * per_image, monkeypatch)
    assert len(calls) == 1
    pieces, calls = _tokens(model, x, "+batch_pieces", 2 * per_image, monkeypatch)
    assert [c[1] for c in calls] == [2, 2, 1]
    assert torch.equal(pieces, whole)


def test_static_pieces_equal_the_whole_batch_in_float64(monkeypatch):
    """Static images with ``stem_once``: pieces along the images, T copies of each stem output."""
    torch.manual_seed(0)
    model = create_model("spikingformer_cifar10_4_384", depth=1, embed_dim=64, num_heads=4).double().eval()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    per_image = 4 * 8 * 32 * 32  # T = 4 copies of D/8 = 8 channels
    whole, _ = _tokens(model, x, "-batch_pieces", per_image, monkeypatch)
    pieces, calls = _tokens(model, x, "+batch_pieces", per_image, monkeypatch)
    assert [c[1] for c in calls] == [1, 1, 1, 1]  # (1, images, C, H, W): the stem once per image
    assert torch.equal(pieces, whole)


def test_float32_pieces_agree_up_to_rounding(monkeypatch):
    model, x = _event_model()
    whole, _ = _tokens(model, x, "-batch_pieces", 1 << 40, monkeypatch)
    pieces, calls = _tokens(model, x, "+batch_pieces", 3 * 32 * 32 * 32, monkeypatch)
    assert len(calls) == 5
    differ = (pieces - whole).abs() > 1e-4 * (1 + whole.abs())
    assert differ.float().mean() <= 1e-3  # spikes flipped by rounding only: a few tokens at most


def test_pieces_on_a_gpu_only_where_the_batch_would_crowd_its_memory(monkeypatch):
    """On a CUDA device (where each piece costs the host a pass of launches) a piece's stem output
    may fill a sixteenth of the device's memory in float32: an 8 GiB GPU takes 2^27 elements a piece,
    so the event model's batch 8 (T = 16, 32 x 128 x 128 stem maps: 2^26 elements) runs whole and a
    batch of 64 in 4 pieces; on the CPU the fixed PIECE_BYTES; elsewhere no pieces. In bf16, twice
    the elements in the same bytes."""
    class Props:
        total_memory = 8 << 30

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    bound = batch_pieces.piece_elements(torch.device("cuda", 0))
    assert bound == 1 << 27
    per_frame_sequence = 16 * 32 * 128 * 128
    assert -(-8 * per_frame_sequence // bound) == 1 and -(-64 * per_frame_sequence // bound) == 4
    assert batch_pieces.piece_elements(torch.device("cuda", 0), 2) == 1 << 28
    assert batch_pieces.piece_elements(torch.device("cpu")) == batch_pieces.PIECE_BYTES // 4 == 1 << 24
    assert batch_pieces.piece_elements(torch.device("cpu"), 2) == 1 << 25
    assert batch_pieces.piece_elements(torch.device("meta")) is None


def test_not_on_other_devices(monkeypatch):
    """On a device that is neither the CPU nor CUDA the tokenizer runs on the whole batch; shown on
    the meta device, which has no memory and no kernels."""
    model, x = _event_model()
    model, x = model.to("meta"), x.to("meta")
    calls = []
    stem = model.tokenizer.stages[0]
    real = stem.convolve
    monkeypatch.setattr(stem, "convolve", lambda part: calls.append(part.shape) or real(part))
    monkeypatch.setattr(batch_pieces, "PIECE_BYTES", 3 * 32 * 32 * 32 * 4)  # pieces on the CPU (as above)
    with routes.configured("+batch_pieces"), torch.no_grad():
        tokens = model.tokenizer(x)
    assert len(calls) == 1 and calls[0] == x.shape and tokens.device.type == "meta"


@pytest.mark.parametrize("case", ["training BN", "autograd", "hook", "small"])
def test_steps_aside(monkeypatch, case):
    """Training-mode BatchNorm (its batch statistics would change), autograd on, a hook on any of
    the tokenizer's modules (a meter must see the whole batch once), or a stem output under the
    limit: one piece."""
    model, x = _event_model()
    limit = 3 * 32 * 32 * 32
    if case == "training BN":
        model.tokenizer.stages[2].bn.train()
    elif case == "hook":
        model.tokenizer.lifs[1].register_forward_hook(lambda *a: None)
    elif case == "small":
        limit = 1 << 40
    _, calls = _tokens(model, x, "+batch_pieces", limit, monkeypatch, grad=case == "autograd")
    assert len(calls) == 1


def test_under_bf16_autocast_a_piece_holds_twice_the_elements(monkeypatch):
    """The bound is in bytes: a float32 input's stem output under bf16 autocast takes 2 bytes an
    element, so the same bound gives half as many pieces (here 5 images: 5 pieces in float32, 3 in
    bf16)."""
    model, x = _event_model()
    per_image = 3 * 32 * 32 * 32
    monkeypatch.setattr(batch_pieces, "PIECE_BYTES", per_image * 4)
    counts = {}
    for autocast in (False, True):
        calls = []
        stem = model.tokenizer.stages[0]
        real = stem.convolve
        monkeypatch.setattr(stem, "convolve", lambda part: calls.append(part.shape[1]) or real(part))
        with routes.configured("+batch_pieces"), torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            assert batch_pieces.stem_itemsize(x) == (2 if autocast else 4)
            model.forward_features(x)
        monkeypatch.setattr(stem, "convolve", real)
        counts[autocast] = calls
    assert counts == {False: [1, 1, 1, 1, 1], True: [2, 2, 1]}
