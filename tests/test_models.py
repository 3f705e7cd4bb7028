"""Tests of the SN layers, conditional BN, residual blocks, ResNet G and SN projection D.

Expected architectures are written out from docs/reference/srgan.md §6 rather than read from the modules.
"""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from source.links import CategoricalConditionalBatchNorm2d, no_power_iteration, spectral_normed
from source.models import MODELS, ResNetGenerator, SNResNetProjectionDiscriminator, build_model
from source.models.resblocks import DiscriminatorBlock, GeneratorBlock, OptimizedBlock, class_norm, glorot_conv

# §6.4: D conv layers in sorted-name order with their (C_out, C_in*k*k) reshaped weight shapes.
IMAGENET_D_CONV_MAP = [
    ("block1.c1", (64, 27)), ("block1.c2", (64, 576)), ("block1.c_sc", (64, 3)),
    ("block2.c1", (64, 576)), ("block2.c2", (128, 576)), ("block2.c_sc", (128, 64)),
    ("block3.c1", (128, 1152)), ("block3.c2", (256, 1152)), ("block3.c_sc", (256, 128)),
    ("block4.c1", (256, 2304)), ("block4.c2", (512, 2304)), ("block4.c_sc", (512, 256)),
    ("block5.c1", (512, 4608)), ("block5.c2", (1024, 4608)), ("block5.c_sc", (1024, 512)),
    ("block6.c1", (1024, 9216)), ("block6.c2", (1024, 9216)),
]


def raw_weight(module: nn.Module) -> torch.Tensor:
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def weight_layers(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]


def avg_pool2(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).mean(dim=(3, 5))


def nearest_up2(x: torch.Tensor) -> torch.Tensor:
    return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


def conv(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, module.weight, module.bias, padding=module.weight.shape[-1] // 2)


# ----------------------------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("resolution, bottom_width", [(32, 4), (48, 6), (64, 4), (128, 4)])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("n_classes", [0, 3])
def test_output_shapes(resolution, bottom_width, channels, n_classes):
    torch.manual_seed(0)
    gen = ResNetGenerator(dim_z=8, bottom_width=bottom_width, ch=2, n_classes=n_classes, resolution=resolution,
                          channels=channels)
    dis = SNResNetProjectionDiscriminator(ch=2, n_classes=n_classes, resolution=resolution, channels=channels)
    z = gen.sample_z(3, "cpu")
    y = gen.sample_y(3, "cpu") if n_classes else None
    images = gen(z, y)
    assert images.shape == (3, channels, resolution, resolution)
    assert images.abs().max() <= 1.0
    assert dis(images, y).shape == (3,)


@pytest.mark.parametrize("resolution, names", [
    (32, ["l1", "block2", "block3", "block4", "b5", "l5"]),
    (48, ["l1", "block2", "block3", "block4", "b5", "l5"]),
    (64, ["l1", "block2", "block3", "block4", "block5", "b6", "l6"]),
    (128, ["l1", "block2", "block3", "block4", "block5", "block6", "b7", "l7"]),
])
def test_generator_module_names_follow_original(resolution, names):
    bottom_width = 6 if resolution == 48 else 4
    gen = ResNetGenerator(ch=2, resolution=resolution, bottom_width=bottom_width)
    assert [name for name, _ in gen.named_children()] == names


@pytest.mark.parametrize("resolution, names", [
    (32, ["block1", "block2", "block3", "block4", "l5", "l_y"]),
    (48, ["block1", "block2", "block3", "block4", "l5", "l_y"]),
    (64, ["block1", "block2", "block3", "block4", "block5", "l6", "l_y"]),
    (128, ["block1", "block2", "block3", "block4", "block5", "block6", "l7", "l_y"]),
])
def test_discriminator_module_names_follow_original(resolution, names):
    dis = SNResNetProjectionDiscriminator(ch=2, n_classes=2, resolution=resolution)
    assert [name for name, _ in dis.named_children()] == names


@pytest.mark.parametrize("resolution, gen_widths, dis_widths, dis_downsample", [
    (32, [1, 1, 1, 1], [1, 1, 1, 1], [True, False, False]),  # resnet_32 / snresnet_32
    (64, [16, 8, 4, 2, 1], [1, 2, 4, 8, 16], [True] * 4),  # resnet_64 / snresnet_64
    (128, [16, 16, 8, 4, 2, 1], [1, 2, 4, 8, 16, 16], [True] * 4 + [False]),  # §6.1 / §6.2
])
def test_layouts(resolution, gen_widths, dis_widths, dis_downsample):
    ch = 2
    gen = ResNetGenerator(ch=ch, resolution=resolution)
    assert gen.l1.out_features == 16 * gen_widths[0] * ch
    blocks = [m for m in gen.children() if isinstance(m, GeneratorBlock)]
    assert [b.c2.out_channels for b in blocks] == [w * ch for w in gen_widths[1:]]
    dis = SNResNetProjectionDiscriminator(ch=ch, resolution=resolution)
    blocks = [m for m in dis.children() if isinstance(m, (OptimizedBlock, DiscriminatorBlock))]
    assert [b.c2.out_channels for b in blocks] == [w * ch for w in dis_widths]
    assert [b.downsample for b in blocks[1:]] == dis_downsample


# ------------------------------------------------------------------------- ImageNet 128 (§6.1, §6.2, §6.4)

@pytest.fixture(scope="module")
def imagenet_models():
    torch.manual_seed(0)
    gen = ResNetGenerator(dim_z=128, bottom_width=4, ch=64, n_classes=1000, resolution=128, spectral_norm=True)
    dis = SNResNetProjectionDiscriminator(ch=64, n_classes=1000, resolution=128)
    return gen, dis


def expected_generator_parameters(ch=64, n_classes=1000, dim_z=128) -> int:
    widths = [16 * ch, 16 * ch, 8 * ch, 4 * ch, 2 * ch, ch]  # §6.1 table
    count = dim_z * 16 * widths[0] + 16 * widths[0]  # l1
    for c_in, c_out in zip(widths[:-1], widths[1:]):
        count += 9 * c_in * c_out + c_out + 9 * c_out * c_out + c_out + c_in * c_out + c_out  # c1, c2, c_sc
        count += 2 * n_classes * (c_in + c_out)  # CBN gamma and beta tables of b1, b2
    return count + 2 * ch + 9 * ch * 3 + 3  # b7 (affine BN), l7


def expected_discriminator_parameters(ch=64, n_classes=1000) -> int:
    count = 9 * 3 * ch + ch + 9 * ch * ch + ch + 3 * ch + ch  # block1
    for c_in, c_out, down in [(ch, 2 * ch, True), (2 * ch, 4 * ch, True), (4 * ch, 8 * ch, True),
                              (8 * ch, 16 * ch, True), (16 * ch, 16 * ch, False)]:  # §6.2 table
        count += 9 * c_in * c_in + c_in + 9 * c_in * c_out + c_out
        if down or c_in != c_out:
            count += c_in * c_out + c_out
    return count + 16 * ch + 1 + n_classes * 16 * ch  # l7, l_y


def test_imagenet_parameter_counts(imagenet_models):
    gen, dis = imagenet_models
    n_gen = sum(p.numel() for p in gen.parameters())
    n_dis = sum(p.numel() for p in dis.parameters())
    assert n_gen == expected_generator_parameters() == 41_996_931
    assert n_dis == expected_discriminator_parameters() == 30_041_857
    assert abs(n_gen / 42.0e6 - 1) < 0.005 and abs(n_dis / 30.0e6 - 1) < 0.005  # §6.1, §6.2
    n_cbn = sum(p.numel() for name, p in gen.named_parameters() if ".gamma." in name or ".beta." in name)
    assert n_cbn == 9_856_000  # §6.1: 9.86M CBN embedding weights


def test_imagenet_discriminator_conv_map(imagenet_models):
    _, dis = imagenet_models
    convs = sorted((name, tuple(raw_weight(m).flatten(1).shape))
                   for name, m in dis.named_modules() if isinstance(m, nn.Conv2d))
    assert convs == IMAGENET_D_CONV_MAP


# ------------------------------------------------------------------------------------ spectral norm

def test_sn_placement():
    plain = ResNetGenerator(ch=4, n_classes=3, resolution=32, spectral_norm=False)
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())

    normed = ResNetGenerator(ch=4, n_classes=3, resolution=32, spectral_norm=True)
    for name, module in weight_layers(normed):
        is_cbn_table = isinstance(module, nn.Embedding)
        assert parametrize.is_parametrized(module, "weight") != is_cbn_table, name

    dis = SNResNetProjectionDiscriminator(ch=4, n_classes=3, resolution=32)
    assert all(parametrize.is_parametrized(m, "weight") for _, m in weight_layers(dis))


def test_sn_normalizes_largest_singular_value_to_one():
    torch.manual_seed(0)
    dis = SNResNetProjectionDiscriminator(ch=8, n_classes=5, resolution=32)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(5, (4,))
    for _ in range(10):
        dis(x, y)
    for name, module in weight_layers(dis):
        raw = raw_weight(module).detach().flatten(1).numpy().astype(np.float64)
        normalized = module.weight.detach().flatten(1).numpy().astype(np.float64)
        assert np.linalg.norm(normalized, 2) == pytest.approx(1.0, rel=0.02), name
        # SN only rescales: the normalized weight is the raw weight over one positive scalar.
        ratio = normalized / raw
        assert np.allclose(ratio, ratio.flat[0], rtol=1e-4), name


def test_no_power_iteration_restores_each_layers_own_mode_and_sn_keeps_chainers_eps():
    """An eval-mode G left in training mode by it would take power steps in its next forward (gSR's and the class
    spectra's per-class maps use it)."""
    layer = spectral_normed(nn.Linear(4, 3)).eval()
    sn = layer.parametrizations.weight[0]
    assert sn.eps == 1e-12
    with no_power_iteration(layer):
        pass
    u = sn._u.clone()
    layer(torch.randn(2, 4))
    assert not sn.training and torch.equal(sn._u, u)


def test_sn_power_iteration_runs_only_in_train_mode():
    dis = SNResNetProjectionDiscriminator(ch=4, resolution=32)
    u = dis.block1.c1.parametrizations.weight[0]._u
    x = torch.randn(2, 3, 32, 32)
    dis.eval()
    before = u.clone()
    dis(x)
    assert torch.equal(u, before)
    dis.train()
    dis(x)
    assert not torch.equal(u, before)


@pytest.mark.parametrize("make", [lambda: nn.Conv2d(5, 7, 3), lambda: nn.Linear(9, 4), lambda: nn.Embedding(6, 8)],
                         ids=["conv", "linear", "embedding"])
def test_sn_matches_torch_spectral_norm_in_values_gradients_and_vectors(make):
    """Our SN takes sigma from the power step and has its own backward: torch's parametrization, float64, agrees in
    the normalized weight, the raw weight's gradient and u, v over training steps, eval-mode forwards included."""
    torch.manual_seed(0)
    ours = spectral_normed(make().double())
    torch.manual_seed(0)
    reference = torch.nn.utils.parametrizations.spectral_norm(make().double())
    ours_sn, reference_sn = ours.parametrizations.weight[0], reference.parametrizations.weight[0]
    assert torch.equal(ours_sn._u, reference_sn._u) and torch.equal(ours_sn._v, reference_sn._v)
    for step, training in enumerate([True, True, False, True]):
        for module in (ours, reference):
            module.train(training)
            module.parametrizations.weight.original.grad = None
        upstream = torch.randn(ours.parametrizations.weight.original.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        weights = [module.weight for module in (ours, reference)]
        torch.testing.assert_close(weights[0], weights[1], rtol=1e-12, atol=1e-14)
        for weight in weights:
            (weight * upstream).sum().backward()
        torch.testing.assert_close(ours.parametrizations.weight.original.grad,
                                   reference.parametrizations.weight.original.grad, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(ours_sn._u, reference_sn._u, rtol=0, atol=1e-14)
        torch.testing.assert_close(ours_sn._v, reference_sn._v, rtol=0, atol=1e-14)
        with torch.no_grad():  # an optimizer step, so that the next power step has something to follow
            for module in (ours, reference):
                module.parametrizations.weight.original.sub_(0.1 * module.parametrizations.weight.original.grad)


def test_sn_gradient_of_a_channels_last_conv_matches_contiguous():
    torch.manual_seed(1)
    conv = spectral_normed(nn.Conv2d(4, 6, 3)).double()
    twin = copy.deepcopy(conv).to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    for module, images in ((conv, x), (twin, x.contiguous(memory_format=torch.channels_last))):
        module(images).square().sum().backward()
    torch.testing.assert_close(twin.parametrizations.weight.original.grad,
                               conv.parametrizations.weight.original.grad, rtol=1e-12, atol=1e-14)


def test_sn_refuses_second_derivatives_through_the_weight():
    """Its backward holds sigma constant: differentiating it again would be wrong, so it is refused."""
    layer = spectral_normed(nn.Linear(5, 3))
    raw = layer.parametrizations.weight.original
    (first,) = torch.autograd.grad(layer.weight.pow(3).sum(), raw, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        first.square().sum().backward()


def test_sn_refuses_a_backward_after_a_later_power_step():
    """u, v are not copied for the backward: a power step before it must stop it, not change the gradient."""
    layer = spectral_normed(nn.Linear(5, 3))
    first = layer.weight.sum()
    layer.weight  # another training-mode forward: a power step, in place
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        first.backward()


# -------------------------------------------------------------------------------------- initialisation

def test_glorot_gains_and_zero_biases():
    torch.manual_seed(0)
    gen = ResNetGenerator(dim_z=64, ch=32, n_classes=10, resolution=32, spectral_norm=True)
    dis = SNResNetProjectionDiscriminator(ch=32, n_classes=10, resolution=32)
    checked = 0
    for model in (gen, dis):
        for name, module in weight_layers(model):
            if isinstance(module, nn.Embedding) and not parametrize.is_parametrized(module):
                continue  # CBN tables, checked in test_cbn_initial_state
            weight = raw_weight(module).detach().double()
            gain = math.sqrt(2.0) if name.endswith((".c1", ".c2")) else 1.0  # §6.3
            receptive = weight[0, 0].numel()
            fan_in, fan_out = weight.shape[1] * receptive, weight.shape[0] * receptive
            bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
            assert weight.abs().max() <= bound, name
            if weight.numel() >= 800:  # enough draws for a 5% std check
                assert weight.std().item() == pytest.approx(bound / math.sqrt(3.0), rel=0.05), name
                checked += 1
            if getattr(module, "bias", None) is not None:
                assert torch.count_nonzero(module.bias) == 0, name
    assert checked == 20  # G: l1, l5, 9 block convs; D: 9 of its 10 convs


# ------------------------------------------------------------------------------------- conditional BN

def test_cbn_initial_state():
    cbn = CategoricalConditionalBatchNorm2d(5, n_classes=3)
    assert torch.equal(cbn.gamma.weight, torch.ones(3, 5))
    assert torch.equal(cbn.beta.weight, torch.zeros(3, 5))


def test_cbn_applies_per_sample_class_affine():
    torch.manual_seed(0)
    cbn = CategoricalConditionalBatchNorm2d(3, n_classes=2)
    gamma = np.array([[0.5, 2.0, -1.0], [3.0, 0.1, 1.5]])
    beta = np.array([[0.0, 1.0, -2.0], [0.3, -0.7, 4.0]])
    with torch.no_grad():
        cbn.gamma.weight.copy_(torch.from_numpy(gamma))
        cbn.beta.weight.copy_(torch.from_numpy(beta))
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    y = torch.tensor([0, 1, 1, 0])

    out = cbn(x, y).detach().numpy()

    xn = x.numpy().astype(np.float64)
    mean = xn.mean(axis=(0, 2, 3), keepdims=True)
    var = xn.var(axis=(0, 2, 3), keepdims=True)
    expected = (xn - mean) / np.sqrt(var + 2e-5) * gamma[y.numpy()][:, :, None, None] + beta[y.numpy()][:, :, None, None]
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    # Chainer decay 0.9 == torch momentum 0.1; running variance uses the unbiased estimate.
    n = xn.size / 3
    np.testing.assert_allclose(cbn.bn.running_mean.numpy(), 0.1 * mean.ravel(), rtol=1e-5)
    np.testing.assert_allclose(cbn.bn.running_var.numpy(), 0.9 + 0.1 * var.ravel() * n / (n - 1), rtol=1e-5)


# --------------------------------------------------------------------------------------------- blocks

def test_generator_block_matches_manual_computation():
    torch.manual_seed(0)
    block = GeneratorBlock(4, 6, class_norm(0), glorot_conv(spectral_norm=True))
    for bn in (block.b1, block.b2):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        nn.init.normal_(bn.weight)
        nn.init.normal_(bn.bias)
    nn.init.normal_(block.c_sc.bias)  # the shortcut conv runs before the up-sampling: exact with a bias too
    block.eval()
    x = torch.randn(2, 4, 5, 5)

    def bn(layer, h):
        return F.batch_norm(h, layer.running_mean, layer.running_var, layer.weight, layer.bias, eps=2e-5)

    h = conv(block.c1, nearest_up2(F.relu(bn(block.b1, x))))
    h = conv(block.c2, F.relu(bn(block.b2, h)))
    expected = h + conv(block.c_sc, nearest_up2(x))
    torch.testing.assert_close(block(x), expected)


def test_discriminator_blocks_match_manual_computation():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)

    down = DiscriminatorBlock(4, 6, downsample=True).eval()
    nn.init.normal_(down.c_sc.bias)  # the shortcut pools before its conv: exact with a bias too
    assert down.c1.weight.shape == (4, 4, 3, 3)  # hidden width = input width
    residual = avg_pool2(conv(down.c2, F.relu(conv(down.c1, F.relu(x)))))
    torch.testing.assert_close(down(x), residual + avg_pool2(conv(down.c_sc, x)))

    keep = DiscriminatorBlock(4, 4, downsample=False).eval()
    assert not hasattr(keep, "c_sc")
    torch.testing.assert_close(keep(x), conv(keep.c2, F.relu(conv(keep.c1, F.relu(x)))) + x)

    first = OptimizedBlock(4, 6).eval()
    residual = avg_pool2(conv(first.c2, F.relu(conv(first.c1, x))))
    torch.testing.assert_close(first(x), residual + conv(first.c_sc, avg_pool2(x)))


def test_discriminator_head_sum_pools_and_projects():
    torch.manual_seed(0)
    dis = SNResNetProjectionDiscriminator(ch=4, n_classes=3, resolution=32).eval()
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([2, 0, 2])
    h = x
    for block in (dis.block1, dis.block2, dis.block3, dis.block4):
        h = block(h)
    h = F.relu(h).sum(dim=(2, 3))
    expected = h @ dis.l5.weight[0] + dis.l5.bias[0] + (dis.l_y.weight[y] * h).sum(dim=1)
    torch.testing.assert_close(dis(x, y), expected)


# ------------------------------------------------------------------------------------ gradients, API

def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    gen = ResNetGenerator(dim_z=8, ch=4, n_classes=3, resolution=32, spectral_norm=True)
    dis = SNResNetProjectionDiscriminator(ch=4, n_classes=3, resolution=32)
    y = torch.tensor([0, 1, 2, 1])
    dis(gen(gen.sample_z(4, "cpu"), y), y).mean().backward()
    for name, param in [*gen.named_parameters(), *dis.named_parameters()]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_sample_z_is_standard_normal_and_seedable():
    gen = ResNetGenerator(dim_z=16, ch=2, resolution=32)
    z = gen.sample_z(4000, "cpu", generator=torch.Generator().manual_seed(1))
    assert z.shape == (4000, 16)
    assert abs(z.mean().item()) < 0.02 and z.std().item() == pytest.approx(1.0, abs=0.02)
    torch.testing.assert_close(z, gen.sample_z(4000, "cpu", generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("kwargs, message", [
    ({"resolution": 96}, "resolution must be one of"),
    ({"bottom_width": 6}, "bottom_width must be 4"),
    ({"resolution": 48}, "bottom_width must be 6, got 4"),
    ({"n_classes": -1}, "n_classes must be >= 0"),
    ({"ch": 0}, "ch must be a positive integer"),
])
def test_generator_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResNetGenerator(**kwargs)


def test_discriminator_rejects_bad_resolution():
    with pytest.raises(ValueError, match="resolution must be one of"):
        SNResNetProjectionDiscriminator(resolution=256)


def test_labels_must_match_conditioning():
    conditional = ResNetGenerator(dim_z=8, ch=2, n_classes=3, resolution=32)
    with pytest.raises(ValueError, match="needs labels"):
        conditional(conditional.sample_z(2, "cpu"))
    unconditional = SNResNetProjectionDiscriminator(ch=2, resolution=32)
    with pytest.raises(ValueError, match="takes no labels"):
        unconditional(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))


def test_build_model():
    gen = build_model("ResNetGenerator", {"ch": 2, "resolution": 32, "n_classes": 5})
    assert isinstance(gen, ResNetGenerator) and gen.n_classes == 5
    assert set(MODELS) == {"ResNetGenerator", "SNResNetProjectionDiscriminator", "BigGANGenerator",
                           "BigGANDiscriminator"}
    with pytest.raises(ValueError, match="unknown model 'ResNetGenrator'; known models: BigGANDiscriminator, "
                                         "BigGANGenerator, ResNetGenerator, SNResNetProjectionDiscriminator"):
        build_model("ResNetGenrator", {})
