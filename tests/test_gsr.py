"""gSR's math against numpy SVD, its class weights, the zero-initialisation trap and its state."""
import numpy as np
import pytest
import torch

from source.models.generator import ResNetGenerator
from source.spectral.gsr import (GroupSpectralRegularizer, class_sigmas, class_weights, conditional_layers,
                                 describe_grouping, group, grouping)

CIFAR10_LT = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def conditional_generator(n_classes: int = 5, ch: int = 32, seed: int = 0) -> ResNetGenerator:
    torch.manual_seed(seed)
    gen = ResNetGenerator(dim_z=8, bottom_width=4, ch=ch, n_classes=n_classes, resolution=32, channels=1)
    with torch.no_grad():  # move the class-conditional parameters away from their (1, 0) start, as training does
        for _, layer in conditional_layers(gen):
            layer.gamma.weight.add_(0.3 * torch.randn_like(layer.gamma.weight))
            layer.beta.weight.add_(0.3 * torch.randn_like(layer.beta.weight))
    return gen


def numpy_sigmas(vectors: torch.Tensor) -> np.ndarray:
    a, b = grouping(vectors.shape[1])
    matrices = vectors.detach().double().numpy().reshape(len(vectors), a, b)
    return np.array([np.linalg.svd(m, compute_uv=False)[0] for m in matrices])


@pytest.mark.parametrize("channels, shape", [(256, (16, 16)), (384, (16, 24)), (96, (8, 12)), (32, (4, 8)),
                                             (1280, (32, 40)), (7, (1, 7))])
def test_grouping_is_the_most_nearly_square_factorization(channels, shape):
    assert grouping(channels) == shape


def test_the_grouping_is_described_and_a_width_without_groups_is_named():
    """A G of prime width (31) is still regularized, but as 1 x 31 vectors: gSR then penalizes their norm, and the
    run says so (a new user's ch 31 trained silently without group structure)."""
    assert describe_grouping(conditional_generator(ch=32)) == "6 layers of 32 channels as 4 x 8"
    described = describe_grouping(conditional_generator(ch=31))
    assert described.startswith("6 layers of 31 channels as 1 x 31; 31 channels have no divisor above 1: no group "
                                 "structure")


def test_group_is_row_major_consecutive_channels():
    vectors = torch.arange(2 * 32.).reshape(2, 32)
    assert group(vectors)[1, 2].tolist() == list(range(32 + 16, 32 + 24))


def test_class_weights_follow_effective_numbers():
    lambdas = class_weights(CIFAR10_LT, beta=0.999, weight=0.5)
    # the released config's values (docs/reference/gsr_studiogan.md A2), head -> tail
    expected = [0.091, 0.095, 0.108, 0.136, 0.189, 0.280, 0.434, 0.693, 1.129, 1.844]
    assert lambdas.tolist() == pytest.approx(expected, abs=1.5e-3)
    assert float(lambdas.mean()) == pytest.approx(0.5)
    assert torch.all(lambdas[1:] > lambdas[:-1])
    assert class_weights(CIFAR10_LT, 0.99, 0.5).max() == pytest.approx(0.992, abs=2e-3)  # BigGAN's flatter beta
    assert class_weights(CIFAR10_LT, 0.999, 0.5, balanced=False).tolist() == [1.0] * 10


def test_sigmas_match_numpy_svd_per_class_and_layer():
    gen = conditional_generator()
    regularizer = GroupSpectralRegularizer([10] * 5, iterations=4)
    regularizer(gen)  # 40 iterations on the first call
    regularizer(gen)
    layers = conditional_layers(gen)
    assert len(layers) == 6 and set(regularizer.last_sigmas) == {name for name, _ in layers}
    for name, layer in layers:
        gains, biases = layer.class_gains_and_biases()
        sigma_gain, sigma_bias = regularizer.last_sigmas[name]
        np.testing.assert_allclose(sigma_gain.numpy(), numpy_sigmas(gains), rtol=1e-3)
        np.testing.assert_allclose(sigma_bias.numpy(), numpy_sigmas(biases), rtol=1e-3)
    exact = class_sigmas(gen)
    name, layer = layers[0]
    np.testing.assert_allclose(exact[name][0], numpy_sigmas(layer.class_gains_and_biases()[0]), rtol=1e-9)


def test_released_bias_estimate_is_a_lower_bound():
    gen = conditional_generator(n_classes=10)
    released = GroupSpectralRegularizer([10] * 10, released_beta_estimate=True)
    released(gen)
    ratios = []
    for name, layer in conditional_layers(gen):
        sigma_gain, sigma_bias = released.last_sigmas[name]
        gains, biases = layer.class_gains_and_biases()
        np.testing.assert_allclose(sigma_gain.numpy(), numpy_sigmas(gains), rtol=1e-3)  # the gain branch is right
        ratios.append(sigma_bias.numpy() / numpy_sigmas(biases))
    ratios = np.concatenate(ratios)
    assert ratios.max() <= 1 + 1e-6 and ratios.mean() < 0.97


def test_loss_is_the_weighted_mean_over_layers_and_classes():
    gen = conditional_generator()
    counts = [100, 50, 20, 10, 5]
    regularizer = GroupSpectralRegularizer(counts, weight=0.5)
    loss = regularizer(gen)
    lambdas = class_weights(counts, 0.999, 0.5)
    expected = sum((lambdas * (numpy_sigmas_t(layer, 0) ** 2 + numpy_sigmas_t(layer, 1) ** 2)).sum()
                   for _, layer in conditional_layers(gen)) / (6 * 5)
    assert loss.item() == pytest.approx(float(expected), rel=1e-3)


def numpy_sigmas_t(layer, index: int) -> torch.Tensor:
    return torch.from_numpy(numpy_sigmas(layer.class_gains_and_biases()[index]))


def test_gradient_reaches_only_the_class_conditional_parameters():
    gen = conditional_generator()
    GroupSpectralRegularizer([10] * 5)(gen).backward()
    with_grad = {name for name, p in gen.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == {f"{name}.{table}.weight" for name, _ in conditional_layers(gen) for table in ("gamma", "beta")}


def test_zero_initialised_parameters_do_not_disable_gsr():
    """sngan_projection's CBN starts at gamma - 1 = beta = 0: the vectors must survive the zero matrices."""
    torch.manual_seed(0)
    gen = ResNetGenerator(dim_z=8, ch=32, n_classes=5, resolution=32, channels=1)
    regularizer = GroupSpectralRegularizer([10] * 5)
    assert regularizer(gen).detach().item() == 0.0
    with torch.no_grad():
        for _, layer in conditional_layers(gen):
            layer.gamma.weight.add_(1e-3 * torch.randn_like(layer.gamma.weight))
            layer.beta.weight.add_(1e-3 * torch.randn_like(layer.beta.weight))
    for _ in range(5):  # 4 steps per call from where the zero matrices left the vectors
        loss = regularizer(gen)
    assert loss.detach().item() > 0
    name, layer = conditional_layers(gen)[0]
    np.testing.assert_allclose(regularizer.last_sigmas[name][0].numpy(),
                               numpy_sigmas(layer.class_gains_and_biases()[0]), rtol=1e-2)


def test_state_round_trip_continues_identically():
    gen = conditional_generator()
    first = GroupSpectralRegularizer([10] * 5, seed=3)
    first(gen)
    second = GroupSpectralRegularizer([10] * 5, seed=3)
    second.load_state_dict(first.state_dict())
    with torch.no_grad():
        for _, layer in conditional_layers(gen):
            layer.gamma.weight.mul_(1.1)
    assert torch.equal(first(gen), second(gen))
    name = next(iter(first.vectors))  # the initial vectors come from (seed, layer): the same on every rank
    fresh = [GroupSpectralRegularizer([10] * 5, seed=s)._initial_vectors(name, group(torch.zeros(5, 32))) for s in (3, 3, 4)]
    assert torch.equal(fresh[0]["v_bias"], fresh[1]["v_bias"]) and not torch.equal(fresh[0]["v_bias"], fresh[2]["v_bias"])
