"""BigGAN G and D (StudioGAN's big_resnet as gSR used it): layouts, parameter counts, attention, hierarchical
latents, the class-only gains gSR regularizes, EMA, and training through train.main (resume, DDP)."""
import copy

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import train
from test_training import CONFIGS
from source.links import SelfAttention, no_power_iteration
from source.models import BigGANDiscriminator, BigGANGenerator, biggan
from source.models.resblocks import DiscriminatorBlock, glorot_conv
from source.regularizers import GeneratorEMA
from source.spectral.gsr import GroupSpectralRegularizer, class_sigmas, conditional_layers
from source.training.checkpoint import load_snapshot
from test_training import _ddp_worker, _free_port, ddp_comparable_keys, tensors_equal, tiny_argv

# The release's counts, computed by instantiating val-iisc/gSRGAN src/models/big_resnet.py (HEAD a2dd776) with each
# config's arguments (ProjGAN, SN in G and D, ortho init). Its D also holds a shared class embedding that no forward
# reads (n_classes x 128 parameters), which ours leaves out: ours = release - n_classes * 128.
# name: (resolution, dim_z, conv dim, n_classes, attention after G block, release G, release D)
RELEASE = {
    "CIFAR10/BigGAN.json": (32, 80, 96, 10, 2, 9_416_196, 2_416_450),
    "LSUN/BigGAN_LSUN.json": (64, 120, 80, 5, 3, 17_420_964, 30_547_762),
    "iNat19/BigGAN_iNat.json": (64, 100, 80, 1010, 3, 17_438_884, 31_962_802),
    "LSUN/BigGAN_LSUN_128.json": (128, 120, 80, 5, 3, 49_297_444, 60_041_522),
}


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def small_g(**overrides) -> BigGANGenerator:
    args = dict(dim_z=16, shared_dim=8, ch=4, n_classes=3, resolution=32, channels=3, attention_after=2)
    torch.manual_seed(0)
    return BigGANGenerator(**(args | overrides))


def small_d(**overrides) -> BigGANDiscriminator:
    args = dict(ch=4, n_classes=3, resolution=32, channels=3, attention_after=1)
    torch.manual_seed(0)
    return BigGANDiscriminator(**(args | overrides))


@pytest.mark.parametrize("config", RELEASE)
def test_parameter_counts_equal_the_release(config, monkeypatch):
    resolution, dim_z, conv, n_classes, attention_g, release_g, release_d = RELEASE[config]
    # orthogonal init and SN leave the counts alone (checked below); skipping them builds the 50M-parameter
    # layouts in a second instead of a minute
    monkeypatch.setattr(biggan, "_orthogonal", lambda module, spectral_norm: module)
    gen = BigGANGenerator(dim_z, 128, conv, n_classes, resolution, 3, attention_g)
    dis = BigGANDiscriminator(conv, n_classes, resolution, 3, attention_after=1)
    assert count(gen) == release_g
    assert count(dis) == release_d - n_classes * 128


def test_counting_without_init_and_sn_counts_the_same(monkeypatch):
    real_g, real_d = count(small_g()), count(small_d())
    monkeypatch.setattr(biggan, "_orthogonal", lambda module, spectral_norm: module)
    assert (count(small_g()), count(small_d())) == (real_g, real_d)


@pytest.mark.parametrize("resolution, dim_z", [(32, 16), (64, 20), (128, 24)])
def test_shapes_for_each_layout(resolution, dim_z):
    gen, dis = small_g(resolution=resolution, dim_z=dim_z, ch=2), small_d(resolution=resolution, ch=8)
    images = gen(torch.randn(3, dim_z), torch.tensor([0, 1, 2]))
    assert images.shape == (3, 3, resolution, resolution) and images.abs().max() <= 1
    assert dis(images, torch.tensor([0, 1, 2])).shape == (3,)
    assert len(gen.blocks) == {32: 3, 64: 4, 128: 5}[resolution]
    assert len(conditional_layers(gen)) == 2 * len(gen.blocks)


def test_every_weight_starts_orthogonal_and_spectrally_normalized():
    gen = small_g()
    raw = gen.blocks[0].c1.parametrizations.weight.original.flatten(1)  # (8, 8 * 9): orthonormal rows
    torch.testing.assert_close(raw @ raw.T, torch.eye(raw.shape[0]), atol=1e-5, rtol=0)
    shared = gen.shared.weight  # (3, 8): orthonormal rows, no SN (as released)
    torch.testing.assert_close(shared @ shared.T, torch.eye(3), atol=1e-5, rtol=0)
    gain = gen.blocks[0].b1.gain
    assert gain.bias is None and gain.parametrizations.weight[0].eps == 1e-6
    assert gen.bn.eps == 1e-4 and gen.blocks[0].b1.bn.eps == 1e-4


def test_self_attention_starts_as_identity_and_matches_a_direct_computation():
    torch.manual_seed(0)
    layer = SelfAttention(16, lambda i, o: torch.nn.Conv2d(i, o, 1, bias=False))
    x = torch.randn(2, 16, 4, 6)
    assert torch.equal(layer(x), x)  # gamma starts at 0
    with torch.no_grad():
        layer.gamma.fill_(0.8)
    q = layer.query(x).flatten(2)
    k, v = F.max_pool2d(layer.key(x), 2).flatten(2), F.max_pool2d(layer.value(x), 2).flatten(2)
    out = torch.empty(2, 8, 24)
    for n in range(2):
        for position in range(24):  # each position: softmax over the pooled positions of <q, k>, then sum of v
            weights = torch.softmax(q[n, :, position] @ k[n], dim=0)
            out[n, :, position] = v[n] @ weights
    expected = x + 0.8 * layer.out(out.view(2, 8, 4, 6))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_attention_sits_after_the_configured_block():
    gen, dis = small_g(attention_after=1), small_d(attention_after=2)
    seen = []
    gen.attention.register_forward_hook(lambda m, i, o: seen.append(("G", i[0].shape[-1])))
    dis.attention.register_forward_hook(lambda m, i, o: seen.append(("D", i[0].shape[-1])))
    dis(gen(torch.randn(2, 16), torch.tensor([0, 1])), torch.tensor([0, 1]))
    assert seen == [("G", 8), ("D", 8)]  # G 4 -> 8 after block 1; D 32 -> 16 -> 8 after block 2
    assert not hasattr(small_g(attention_after=0), "attention")


def test_hierarchical_latents_feed_one_chunk_to_each_block():
    gen = small_g().eval()  # dim_z 16 = 4 chunks of 4: the linear layer, blocks 1, 2, 3
    outputs = {}
    for index, block in enumerate(gen.blocks):
        block.register_forward_hook(lambda m, i, o, index=index: outputs.__setitem__(index, o.clone()))
    z, y = torch.randn(2, 16), torch.tensor([0, 2])
    gen(z, y)
    before = dict(outputs)
    changed = z.clone()
    changed[:, 12:] += 1.0  # the last chunk: only block 3's conditional BNs see it
    gen(changed, y)
    assert torch.equal(outputs[0], before[0]) and torch.equal(outputs[1], before[1])
    assert not torch.equal(outputs[2], before[2])
    changed = z.clone()
    changed[:, 4:8] += 1.0  # block 1's chunk changes everything from block 1 on
    gen(changed, y)
    assert not torch.equal(outputs[0], before[0])


def test_class_only_gains_equal_the_maps_applied_to_padded_embeddings():
    gen = small_g()
    gen(torch.randn(4, 16), torch.tensor([0, 1, 2, 0]))  # a training step moves SN's u
    state = copy.deepcopy(gen.state_dict())
    for _, layer in conditional_layers(gen):
        gains, biases = layer.class_gains_and_biases()
        padded = F.pad(gen.shared.weight, (0, gen.chunk))  # the release: [embedding; zeros of the z chunk]
        with no_power_iteration(layer):
            torch.testing.assert_close(gains, layer.gain(padded), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(biases, layer.bias(padded), rtol=1e-5, atol=1e-6)
        assert gains.shape == biases.shape == (3, layer.bn.num_features)
    assert tensors_equal(gen.state_dict(), state), "reading the class gains must not step spectral norm"


def test_gsr_on_biggan_is_alive_at_init_and_reaches_the_embedding_and_the_cbn_maps():
    gen = small_g()
    penalty = GroupSpectralRegularizer([30, 10, 2], weight=0.5)(gen)
    assert penalty > 0  # orthogonal init: no zero-initialisation trap (unlike sngan_projection's gamma = 1, beta = 0)
    penalty.backward()
    with_grad = {name for name, p in gen.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "shared.weight" in with_grad
    assert with_grad <= {"shared.weight"} | {f"{layer}.{table}.parametrizations.weight.original"
                                             for layer, _ in conditional_layers(gen) for table in ("gain", "bias")}
    sigmas = class_sigmas(gen)
    assert len(sigmas) == 6 and all(len(gain) == 3 and min(gain) > 0 for gain, _ in sigmas.values())


def test_ema_copy_conditions_on_its_own_shared_embedding():
    gen = small_g()
    ema = GeneratorEMA(gen, decay=0.5, start_iteration=0)
    layer = ema.module.blocks[0].b1
    assert layer.shared is ema.module.shared and layer.shared is not gen.shared
    with torch.no_grad():
        gen.shared.weight.add_(1.0)
    ema.update(gen, iteration=0)
    torch.testing.assert_close(ema.module.shared.weight, gen.shared.weight - 0.5)
    torch.testing.assert_close(layer.class_gains_and_biases()[0],
                               ema.module.shared.weight @ layer.gain.weight[:, :8].T)


def test_relu_shortcut_is_the_release_block_function():
    torch.manual_seed(0)
    block = DiscriminatorBlock(4, 4, downsample=False, hidden_channels=4, make_conv=glorot_conv(False),
                               relu_shortcut=True)
    x = torch.randn(2, 4, 8, 8)
    residual = block.c2(F.relu(block.c1(F.relu(x))))
    torch.testing.assert_close(block(x), residual + F.relu(x))  # identity shortcut of ReLU(x), not of x
    block.relu_shortcut = False
    torch.testing.assert_close(block(x), residual + x)


@pytest.mark.parametrize("args, message", [
    (dict(dim_z=18), "dim_z must be a positive multiple of 4"),
    (dict(attention_after=4), "attention_after must be between 0"),
    (dict(n_classes=0), "BigGAN is class-conditional"),
    (dict(ch=3), "divisible by 8"),
])
def test_bad_arguments_give_one_line_errors(args, message):
    with pytest.raises(ValueError, match=message):
        small_g(**args)


# --- through train.main -------------------------------------------------------------------------------

BIGGAN = ["models.generator={name: BigGANGenerator, args: {dim_z: 16, shared_dim: 8, ch: 2, n_classes: 3, "
          "resolution: 32, channels: 3, attention_after: 2}}",
          "models.discriminator={name: BigGANDiscriminator, args: {ch: 4, n_classes: 3, resolution: 32, "
          "channels: 3, attention_after: 1}}",
          "updater.gsr.enabled=true", "updater.lecam.weight=0.3", "updater.diffaugment=color,translation,cutout",
          "updater.ema.enabled=true", "updater.ema.start_iteration=1", "updater.ema.decay=0.9",
          "dataset.args.long_tail.ratio=7", "spectra_interval=2", "evaluation.metrics=[]"]


def test_biggan_resume_is_bit_exact_with_every_term_on(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train.main(tiny_argv(straight, 4, *BIGGAN, "updater.n_dis=2")) == 0
    argv = tiny_argv(resumed, 4, *BIGGAN, "updater.n_dis=2")
    assert train.main(argv + ["--resume", str(straight / "snapshots" / "snapshot_iter_2.pt")]) == 0
    a = load_snapshot(straight / "snapshots" / "snapshot_iter_4.pt")
    b = load_snapshot(resumed / "snapshots" / "snapshot_iter_4.pt")
    for key in ("gen", "dis", "gen_ema"):
        assert tensors_equal(a[key], b[key]), key
    assert any(key.startswith("attention.") for key in a["gen"]) and "shared.weight" in a["gen_ema"]
    assert {"blocks.0.c1", "blocks.3.c2", "attention.query"} <= set(a["updater"]["sr"]["ratios"]), \
        "SR (on in the tiny runs) acts on every SN conv of BigGAN's D"
    assert (straight / "class_spectra.jsonl").read_text().count("\n") == 2


def test_biggan_ddp_two_ranks_match_one_process(tmp_path, ranks_threads):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert train.main(tiny_argv(single, 2, *BIGGAN)) == 0
    mp.spawn(_ddp_worker, args=(2, _free_port(), tiny_argv(ddp, 2, *BIGGAN)), nprocs=2, join=True)
    a = load_snapshot(single / "snapshots" / "snapshot_iter_2.pt")
    b = load_snapshot(ddp / "snapshots" / "snapshot_iter_2.pt")
    # G's attention weights get gradients scaled by its gamma, still ~1e-4 after two steps: tiny, but compared
    gen_keys = ddp_comparable_keys(a, "gen", "generator", small_gradients=("attention.",))
    for net, keys in (("gen", gen_keys), ("dis", ddp_comparable_keys(a, "dis", "discriminator"))):
        for key in keys:
            torch.testing.assert_close(b[net][key], a[net][key], rtol=1e-4, atol=1e-5, msg=f"{net} {key}")
    for key in gen_keys:
        torch.testing.assert_close(b["gen_ema"][key], a["gen_ema"][key], rtol=1e-4, atol=1e-5, msg=f"EMA {key}")


@pytest.mark.parametrize("name, counts, terms", [
    ("cifar10_lt_biggan", ("9,416,196", "2,415,170"), "LeCam 0.1 (gsr form, decay 0.99); gSR (class-balanced w 0.5, "
                                                      "beta 0.99, 4 power steps; 6 layers of 384 channels as 16 x 24); "
                                                      "EMA of G 0.9999 from 1000"),
    ("lsun_lt_biggan", ("17,420,964", "30,547,122"), "gSR (class-balanced w 0.5, beta 0.99"),
    ("inat19_biggan", ("17,438,884", "31,833,522"), "LeCam 0.01 (gsr form, decay 0.99); gSR (class-balanced w 0.01, "
                                                    "beta 0.999, 4 power steps; 1 layer of 1280 channels as 32 x 40, "),
    ("fmnist_lt_biggan", ("129,154", "67,810"), "terms  gSR (class-balanced w 0.5, beta 0.999, 4 power steps; 6 layers "
                                                "of 32 channels as 4 x 8); fake"),
])
def test_biggan_configs_dry_run_with_the_release_counts(name, counts, terms, capsys, tmp_path):
    empty = ["--set", f"dataset.args.root={tmp_path}"] if name.startswith("cifar10") else []  # nothing downloads
    assert train.main(["--config", str(CONFIGS / "gsr" / f"{name}.yaml"), "--dry-run", *empty]) == 0
    out = capsys.readouterr().out
    assert f"BigGANGenerator: {counts[0]} parameters" in out and f"BigGANDiscriminator: {counts[1]} parameters" in out
    assert terms in out and ("DiffAugment color,translation,cutout" in out) == (name != "fmnist_lt_biggan")


def test_biggan_left_at_its_default_resolution_and_classes_trains_on_data_of_that_size(tmp_path):
    """Data size, channels and classes were checked against SNGAN's defaults (128 px, unconditional), so a BigGAN
    config that left resolution or n_classes to BigGAN's own (32 px, 10 classes) was refused or mislabelled."""
    defaults = ["models.generator={name: BigGANGenerator, args: {dim_z: 16, shared_dim: 8, ch: 2}}",
                "models.discriminator={name: BigGANDiscriminator, args: {ch: 4}}", "dataset.args.n_classes=10",
                "dataset.args.channels=3", "evaluation.metrics=[]"]
    assert train.main(tiny_argv(tmp_path / "run", 1, *defaults)) == 0
    snapshot = load_snapshot(tmp_path / "run" / "snapshots" / "snapshot_iter_1.pt")
    assert snapshot["config"]["dataset"]["args"]["size"] == 32
    assert snapshot["gen"]["shared.weight"].shape[0] == 10
