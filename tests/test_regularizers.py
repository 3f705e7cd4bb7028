"""The adversarial losses, DiffAugment, LeCam (both forms) and the EMA of G, tested alone; their use in training is
in test_gsr_training.py."""
import math

import pytest
import torch
from torch import nn

from source.regularizers import DiffAugment, GeneratorEMA, LeCam, parse_policy
from source.regularizers.diffaugment import augment, draw
from source.regularizers.losses import LOSSES, dcgan_dis, dcgan_gen, hinge_dis, hinge_gen
from source.training.distributed import World

CPU = World(rank=0, size=1, local_rank=0, device=torch.device("cpu"))


def test_adversarial_losses_on_known_logits():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert float(hinge_dis(real, fake)) == pytest.approx((0 + 0.5) / 2 + (0 + 1) / 2)  # margins of 1, means
    assert float(hinge_gen(torch.tensor([1.0, 3.0]))) == -2.0
    assert float(dcgan_dis(torch.zeros(3), torch.zeros(3))) == pytest.approx(2 * math.log(2))
    assert float(dcgan_dis(torch.tensor([3.0]), torch.tensor([-1.0]))) == pytest.approx(
        math.log1p(math.exp(-3)) + math.log1p(math.exp(-1)))  # -log sigmoid(real) - log(1 - sigmoid(fake))
    assert float(dcgan_gen(torch.tensor([-1.0]))) == pytest.approx(math.log1p(math.e))  # non-saturating
    assert LOSSES == {"hinge": (hinge_dis, hinge_gen), "dcgan": (dcgan_dis, dcgan_gen)}


def test_policy_parsing_and_errors():
    assert parse_policy("color, translation,cutout") == ("color", "translation", "cutout")
    assert parse_policy("") == ()
    with pytest.raises(ValueError, match="unknown DiffAugment operation 'flip'"):
        parse_policy("color,flip")


def test_translation_moves_content_and_fills_with_zero():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 4, 5] = 1.0
    out = augment(x, {"shift_rows": torch.tensor([1]), "shift_columns": torch.tensor([-2])})
    assert out[0, 0, 3, 7] == 1.0 and out.sum() == 1.0  # out[i, j] = x[i + 1, j - 2]
    full = augment(torch.ones(1, 1, 8, 8), {"shift_rows": torch.tensor([1]), "shift_columns": torch.tensor([0])})
    assert full[0, 0, -1].sum() == 0 and full[0, 0, :-1].sum() == 7 * 8  # the row shifted in is zero


def test_cutout_zeroes_a_half_size_square_clipped_at_the_border():
    out = augment(torch.ones(2, 3, 8, 8), {"cut_rows": torch.tensor([4, 0]), "cut_columns": torch.tensor([4, 8])})
    assert (out[0, 0] == 0).sum() == 16 and out[0, :, 2:6, 2:6].abs().sum() == 0
    assert (out[1, 0] == 0).sum() == 2 * 2 and out[1, :, 0:2, 6:8].abs().sum() == 0


def test_color_is_brightness_saturation_contrast_per_sample():
    x = torch.randn(2, 3, 4, 4)
    identity = {"brightness": torch.tensor([0.25, 0.0]), "saturation": torch.ones(2), "contrast": torch.ones(2)}
    out = augment(x, identity)
    torch.testing.assert_close(out[0], x[0] + 0.25)
    torch.testing.assert_close(out[1], x[1])
    gray = augment(x, {"brightness": torch.zeros(2), "saturation": torch.zeros(2), "contrast": torch.ones(2)})
    torch.testing.assert_close(gray[:, 0], gray[:, 1])  # saturation 0 leaves the channel mean only
    x = x + torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1)  # channel means that differ
    contrast = augment(x, {"brightness": torch.zeros(2), "saturation": torch.ones(2), "contrast": torch.tensor([2., .5])})
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # over the whole image, channels too
    torch.testing.assert_close(contrast, (x - mean) * torch.tensor([2.0, 0.5]).view(2, 1, 1, 1) + mean)


def test_random_parameters_cover_the_official_ranges():
    params = draw(parse_policy("color,translation,cutout"), 20000, 16, torch.Generator().manual_seed(0), "cpu")
    for name, low, high in (("brightness", -0.5, 0.5), ("saturation", 0.0, 2.0), ("contrast", 0.5, 1.5)):
        values = params[name]
        assert low <= float(values.min()) < low + 0.01 and high - 0.01 < float(values.max()) <= high, name
    for name in ("shift_rows", "shift_columns"):  # 1/8 of 16, both ways
        assert set(params[name].tolist()) == set(range(-2, 3)), name
    for name in ("cut_rows", "cut_columns"):  # the square's centre anywhere on 0..16 (even side: size + 1 places)
        assert set(params[name].tolist()) == set(range(17)), name


def test_augmentation_is_differentiable_and_reproducible():
    policy = parse_policy("color,translation,cutout")
    params = draw(policy, 4, 16, torch.Generator().manual_seed(5), "cpu")
    again = draw(policy, 4, 16, torch.Generator().manual_seed(5), "cpu")
    assert all(torch.equal(params[k], again[k]) for k in params)
    assert int(params["shift_rows"].abs().max()) <= 2  # 1/8 of 16
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    DiffAugment("color,translation,cutout", 16).apply(x, params, slice(0, 4)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_lecam_released_form_anchors_and_penalty():
    lecam = LeCam(weight=1.0, form="gsr", decay=0.99, start_iteration=0, batchsize=4, device=torch.device("cpu"))
    real, fake = torch.tensor([1.0, -1.0]), torch.tensor([0.5, -2.0])
    # iteration 0: anchors are zero
    assert float(lecam.penalty(real, fake, slice(0, 2), 0)) == pytest.approx((1 + 0) / 2 + (0.25 + 0) / 2)
    lecam.end_step(0, CPU)
    penalty = lecam.penalty(real, fake, slice(2, 4), 1)  # updated before the penalty, per batch position
    assert lecam.anchor_real.tolist() == pytest.approx([0, 0, 0.01, -0.01])
    assert lecam.anchor_fake.tolist() == pytest.approx([0, 0, 0.005, -0.02])
    expected = ((1 - 0.005) ** 2 + (-1 + 0.02) ** 2 * 0) / 2 + ((0.5 - 0.01) ** 2 + 0) / 2
    assert float(penalty) == pytest.approx(expected)


def test_lecam_gan_form_scalar_anchors_start_iteration_and_sign():
    lecam = LeCam(weight=2.0, form="lecam", decay=0.9, start_iteration=2, batchsize=4, device=torch.device("cpu"))
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 1.0])
    assert float(lecam.penalty(real, fake, slice(0, 2), 0)) == 0.0  # before start_iteration: only tracking
    lecam.end_step(0, CPU)
    assert float(lecam.anchor_real) == pytest.approx(2.0) and float(lecam.anchor_fake) == pytest.approx(0.0)
    lecam.penalty(real + 1, fake + 1, slice(0, 2), 2)
    lecam.end_step(2, CPU)  # from start_iteration on: EMA with the decay
    assert float(lecam.anchor_real) == pytest.approx(0.9 * 2 + 0.1 * 3)
    assert float(lecam.anchor_fake) == pytest.approx(0.9 * 0 + 0.1 * 1)
    penalty = lecam.penalty(torch.tensor([0.0]), torch.tensor([5.0]), slice(0, 1), 3)
    assert float(penalty) == pytest.approx(2.0 * (0 + 0))  # a fake above the real anchor is not penalized here
    penalty = lecam.penalty(torch.tensor([1.0]), torch.tensor([0.5]), slice(0, 1), 3)
    assert float(penalty) == pytest.approx(2.0 * ((1.0 - 0.1) ** 2 + (2.1 - 0.5) ** 2))  # relu(r - a_f), relu(a_r - f)
    released = LeCam(weight=2.0, form="gsr", decay=0.9, start_iteration=0, batchsize=1, device=torch.device("cpu"))
    assert float(released.penalty(torch.tensor([0.0]), torch.tensor([5.0]), slice(0, 1), 0)) == pytest.approx(50.0)


def test_lecam_state_round_trip_and_shape_check():
    lecam = LeCam(1.0, "gsr", 0.99, 0, 4, torch.device("cpu"))
    lecam.penalty(torch.ones(4), torch.ones(4), slice(0, 4), 1)
    other = LeCam(1.0, "gsr", 0.99, 0, 4, torch.device("cpu"))
    other.load_state_dict(lecam.state_dict())
    assert torch.equal(other.anchor_real, lecam.anchor_real)
    with pytest.raises(ValueError, match="form or batch size changed"):
        LeCam(1.0, "lecam", 0.99, 0, 4, torch.device("cpu")).load_state_dict(lecam.state_dict())


def test_ema_copies_before_start_then_averages_every_state_entry():
    model = nn.BatchNorm1d(3)
    ema = GeneratorEMA(model, decay=0.9, start_iteration=2)
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.running_mean.fill_(4.0)
    model.num_batches_tracked.fill_(7)
    ema.update(model, iteration=1)  # before the start: a copy
    assert ema.module.weight.tolist() == [2.0] * 3 and int(ema.module.num_batches_tracked) == 7
    with torch.no_grad():
        model.weight.fill_(12.0)
        model.running_mean.fill_(14.0)
    ema.update(model, iteration=2)
    assert ema.module.weight.tolist() == pytest.approx([0.9 * 2 + 0.1 * 12] * 3)
    assert ema.module.running_mean.tolist() == pytest.approx([0.9 * 4 + 0.1 * 14] * 3)  # buffers too, as released
    assert not ema.module.weight.requires_grad
