"""SR, spectra and collapse detection against independent numpy re-implementations and known values."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from source.spectral import (
    CollapseDetector,
    SpectralRegularizer,
    collapse_score,
    compute_spectra,
    effective_rank,
    layer_index_map,
    layer_scores,
    list_spectra,
    load_spectra,
    save_spectra,
)
from source.spectral.spectra import LayerSpectrum, spectral_norm_layers, weight_matrix
from source.spectral.sr import Factors, dynamic_compensation, static_compensation
from test_training import end_finished_rank

CONVS = ["block1.c1", "block1.c2", "block1.c_sc", "block2.c1", "block2.c2", "block2.c_sc"]
LINEARS = ["l7", "l_y"]


def tiny_dis(seed: int = 0) -> nn.Module:
    """A D-like module: SN convs (two shapes shared by two layers each, one with C_out > C_in*k*k),
    an SN linear, an SN embedding and a plain conv that SR must ignore. Built in unsorted order."""
    torch.manual_seed(seed)
    dis = nn.Module()
    dis.l_y = spectral_norm(nn.Embedding(5, 8))
    dis.block2 = nn.Module()
    dis.block2.c_sc = spectral_norm(nn.Conv2d(8, 16, 1))
    dis.block2.c2 = spectral_norm(nn.Conv2d(8, 8, 3))
    dis.block2.c1 = spectral_norm(nn.Conv2d(8, 8, 3))
    dis.block1 = nn.Module()
    dis.block1.c_sc = spectral_norm(nn.Conv2d(3, 8, 1))
    dis.block1.c1 = spectral_norm(nn.Conv2d(3, 8, 3))
    dis.block1.c2 = spectral_norm(nn.Conv2d(8, 8, 3))
    dis.l7 = spectral_norm(nn.Linear(8, 4))
    dis.plain = nn.Conv2d(3, 4, 3)
    return dis


def sn_layer(dis: nn.Module, name: str) -> nn.Module:
    return dis.get_submodule(name)


def raw_matrices(dis: nn.Module, names: list[str]) -> dict[str, np.ndarray]:
    return {
        name: sn_layer(dis, name).parametrizations.weight.original.detach().double().numpy().reshape(
            sn_layer(dis, name).parametrizations.weight.original.shape[0], -1
        )
        for name in names
    }


def perturb(dis: nn.Module, seed: int, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in dis.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


class NumpyDynamicSR:
    """Plain numpy statement of srgan.md §2.1, used as the reference."""

    def __init__(self) -> None:
        self.envelope: dict[str, np.ndarray] | None = None

    def step(self, matrices: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.envelope is None:
            self.envelope = {}
            for name, w in matrices.items():
                s = np.linalg.svd(w, compute_uv=False)
                self.envelope[name] = s / s[0]
            return matrices
        out = {}
        for name, w in matrices.items():
            u, s, vt = np.linalg.svd(w, full_matrices=False)
            self.envelope[name] = np.maximum(self.envelope[name], s / s[0])
            out[name] = u @ np.diag(s[0] * self.envelope[name]) @ vt
        return out


def numpy_static_sr(w: np.ndarray) -> np.ndarray:
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    s = s / s[0]
    s[: len(s) // 2] = 1
    return u @ np.diag(s) @ vt


def assert_matrices_close(dis: nn.Module, expected: dict[str, np.ndarray]) -> None:
    actual = raw_matrices(dis, list(expected))
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=0, atol=2e-6, err_msg=name)


# ---------------------------------------------------------------------------------------------
# SR


@pytest.mark.parametrize("include_linear, solve_on", [(False, None), (True, None), (True, "cpu")])
def test_dynamic_sr_matches_numpy_over_several_calls(include_linear, solve_on):
    dis = tiny_dis()
    names = CONVS + (LINEARS if include_linear else [])
    untouched = [] if include_linear else LINEARS
    sr = SpectralRegularizer("dynamic", interval=5, include_linear=include_linear, solve_on=solve_on)
    reference = NumpyDynamicSR()
    for call in range(4):
        before = raw_matrices(dis, names + untouched)
        plain = dis.plain.weight.detach().clone()
        expected = reference.step({name: before[name] for name in names})
        assert sr(dis, iteration=5 * call) is True
        assert_matrices_close(dis, expected)
        assert_matrices_close(dis, {name: before[name] for name in untouched})
        assert torch.equal(dis.plain.weight, plain)
        assert sorted(sr.ratios) == sorted(names)
        for name in names:
            np.testing.assert_allclose(sr.ratios[name].numpy(), reference.envelope[name], atol=1e-10)
        perturb(dis, seed=call)


def test_first_dynamic_call_records_without_modifying():
    dis = tiny_dis()
    before = {name: p.detach().clone() for name, p in dis.named_parameters()}
    sr = SpectralRegularizer("dynamic")
    assert not sr.recorded
    assert sr(dis, 0) is True
    assert sr.recorded
    for name, p in dis.named_parameters():
        assert torch.equal(p, before[name]), name


def test_dynamic_sr_keeps_s1_and_lifts_spectrum_to_envelope():
    dis = tiny_dis()
    sr = SpectralRegularizer("dynamic", interval=1)
    sr(dis, 0)
    for call in range(1, 4):
        perturb(dis, seed=10 + call, scale=0.1)
        before = raw_matrices(dis, CONVS)
        sr(dis, call)
        after = raw_matrices(dis, CONVS)
        for name in CONVS:
            s_before = np.linalg.svd(before[name], compute_uv=False)
            s_after = np.linalg.svd(after[name], compute_uv=False)
            np.testing.assert_allclose(s_after[0], s_before[0], rtol=1e-6)
            envelope = sr.ratios[name].numpy()
            np.testing.assert_allclose(s_after / s_after[0], envelope, atol=1e-6)  # exactly on the envelope
            assert np.all(s_after / s_after[0] >= s_before / s_before[0] - 1e-6)  # only raised


@pytest.mark.parametrize("seed", range(4))
def test_sr_edits_of_a_rank_deficient_weight_keep_its_zeros_and_stay_finite(seed):
    """Dead filters (zero rows) and a filter repeating another: the Gram matrix's eigh returns their directions as
    rounding (up to 1e-15 of the largest eigenvalue, or negative); dividing the raise by that noise gave the dead
    rows values of order 1 (seed 1) and, without the clamp or the zero guard, NaN for every weight."""
    torch.manual_seed(seed)
    w = torch.randn(2, 8, 27, dtype=torch.float64)
    w[0, 3] = w[0, 5] = 0
    w[1, 5] = 2 * w[1, 3]
    assert torch.equal(Factors(w).s[0, -2:], torch.zeros(2, dtype=torch.float64)) and Factors(w).s[1, -1] == 0
    rebuilt, envelope = dynamic_compensation(w, torch.full((2, 8), 0.5, dtype=torch.float64))
    assert torch.isfinite(envelope).all() and torch.equal(envelope[:, -1], torch.full((2,), 0.5, dtype=torch.float64))
    for edited in (rebuilt, static_compensation(w)):
        assert torch.isfinite(edited).all()
        assert edited[0, [3, 5]].abs().max() < 1e-12  # the dead filters stay dead
        assert (edited[1, 5] - 2 * edited[1, 3]).abs().max() < 1e-12  # and the repeat a repeat
        assert not torch.allclose(edited, w)  # while the rest is edited


@pytest.mark.parametrize("mode", ["dynamic", "static", "rescale"])
def test_an_all_zero_weight_is_left_as_it_is_and_poisons_nothing(mode):
    """s_1 = 0 (a conv zero-initialised): its normalized spectrum 0/0 was NaN, which the dynamic envelope kept for
    good (torch.maximum keeps NaN) and rescale wrote into the weight."""
    dis, reference = tiny_dis(), tiny_dis()
    with torch.no_grad():
        sn_layer(dis, "block1.c2").parametrizations.weight.original.zero_()
    sr, sr_reference = SpectralRegularizer(mode, interval=1), SpectralRegularizer(mode, interval=1)
    for call in range(3):
        sr(dis, call)
        sr_reference(reference, call)
        assert not sn_layer(dis, "block1.c2").parametrizations.weight.original.any()
        assert all(torch.isfinite(p).all() for p in dis.parameters())
        assert all(torch.isfinite(r).all() for r in sr.ratios.values())
    for name in ("block2.c1", "block2.c2"):  # solved in one batch with the zero weight (the same shape): as without it
        torch.testing.assert_close(sn_layer(dis, name).parametrizations.weight.original,
                                   sn_layer(reference, name).parametrizations.weight.original, rtol=0, atol=1e-6)
    with torch.no_grad():  # the layer comes alive: its envelope starts from its spectrum, the other layers' go on
        sn_layer(dis, "block1.c2").parametrizations.weight.original.normal_()
    sr(dis, 3)
    assert all(torch.isfinite(p).all() for p in dis.parameters())


def test_static_sr_matches_numpy_and_normalizes():
    dis = tiny_dis()
    sr = SpectralRegularizer("static", interval=5)
    for call in range(3):
        before = raw_matrices(dis, CONVS + LINEARS)
        assert sr(dis, 5 * call) is True
        assert_matrices_close(dis, {name: numpy_static_sr(before[name]) for name in CONVS})
        assert_matrices_close(dis, {name: before[name] for name in LINEARS})
        for name, w in raw_matrices(dis, CONVS).items():
            s = np.linalg.svd(w, compute_uv=False)
            np.testing.assert_allclose(s[: len(s) // 2], 1, atol=1e-6)
            assert np.all(s <= 1 + 1e-6)
        perturb(dis, seed=call)
    assert sr.ratios == {}


def test_rescale_control_divides_by_sigma_1_and_keeps_the_spectrum_shape():
    dis = tiny_dis()
    sr = SpectralRegularizer("rescale", interval=5)
    for call in range(2):
        before = raw_matrices(dis, CONVS + LINEARS)
        assert sr(dis, 5 * call) is True
        for name, w in raw_matrices(dis, CONVS).items():
            s_before = np.linalg.svd(before[name], compute_uv=False)
            np.testing.assert_allclose(w, before[name] / s_before[0], rtol=1e-5, atol=1e-7)
            s = np.linalg.svd(w, compute_uv=False)
            np.testing.assert_allclose(s, s_before / s_before[0], atol=1e-6)  # shape kept, s_1 = 1
        assert_matrices_close(dis, {name: before[name] for name in LINEARS})
        perturb(dis, seed=call)
    assert sr.ratios == {}


def test_interval_is_respected():
    dis = tiny_dis()
    sr = SpectralRegularizer("static", interval=5)
    before = {name: p.detach().clone() for name, p in dis.named_parameters()}
    assert [sr(dis, it) for it in range(1, 5)] == [False] * 4
    for name, p in dis.named_parameters():
        assert torch.equal(p, before[name])
    assert sr(dis, 10) is True
    assert not torch.equal(dis.block1.c1.parametrizations.weight.original, before["block1.c1.parametrizations.weight.original"])


def test_sr_leaves_optimizer_state_and_sn_vectors_alone():
    dis = tiny_dis()
    optimizer = torch.optim.Adam(dis.parameters(), lr=1e-3, betas=(0.0, 0.999))
    for p in dis.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    parameters = list(dis.parameters())
    pointers = [p.data_ptr() for p in parameters]
    state = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in parameters}
    buffers = {name: b.clone() for name, b in dis.named_buffers()}
    sr = SpectralRegularizer("dynamic", interval=1, include_linear=True)
    sr(dis, 0)
    perturb(dis, seed=3)
    sr(dis, 1)
    assert list(dis.parameters()) == parameters and [p.data_ptr() for p in parameters] == pointers
    for p in parameters:
        assert optimizer.state[p].keys() == state[id(p)].keys()
        for key, value in optimizer.state[p].items():
            assert torch.equal(value, state[id(p)][key])
    assert {name for name, _ in dis.named_buffers()} == set(buffers)
    for name, b in dis.named_buffers():
        assert torch.equal(b, buffers[name]), name
    optimizer.step()  # the optimizer still steps the edited parameters


def test_state_dict_round_trip_continues_identically():
    dis = tiny_dis()
    sr = SpectralRegularizer("dynamic", interval=1)
    sr(dis, 0)
    perturb(dis, seed=1)
    sr(dis, 1)
    buffer = io.BytesIO()
    torch.save(sr.state_dict(), buffer)
    buffer.seek(0)
    restored = SpectralRegularizer("dynamic", interval=1)
    restored.load_state_dict(torch.load(buffer))
    assert restored.state_dict()["mode"] == "dynamic" and sorted(restored.ratios) == sorted(sr.ratios)
    twin = tiny_dis()
    twin.load_state_dict(dis.state_dict())
    perturb(dis, seed=2)
    perturb(twin, seed=2)
    sr(dis, 2)
    restored(twin, 2)
    for (name, a), (_, b) in zip(dis.named_parameters(), twin.named_parameters()):
        assert torch.equal(a, b), name


def test_rebase_on_resume_forgets_envelope():
    dis = tiny_dis()
    sr = SpectralRegularizer("dynamic", interval=1)
    sr(dis, 0)
    rebased = SpectralRegularizer("dynamic", interval=1, rebase_on_resume=True)
    rebased.load_state_dict(sr.state_dict())
    assert not rebased.recorded
    perturb(dis, seed=5)
    before = {name: p.detach().clone() for name, p in dis.named_parameters()}
    assert rebased(dis, 1) is True
    for name, p in dis.named_parameters():
        assert torch.equal(p, before[name])
    expected = {name: np.linalg.svd(w, compute_uv=False) for name, w in raw_matrices(dis, CONVS).items()}
    for name, s in expected.items():
        np.testing.assert_allclose(rebased.ratios[name].numpy(), s / s[0], atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("mode", ["dynamic", "static", "rescale"])
def test_sr_solved_on_the_cpu_edits_gpu_weights_as_solved_on_the_gpu(mode):
    """performance.sr_on_cpu: the same float64 edit, copied back to the weights' device; the envelope stays there."""
    on_gpu, solved_on_cpu = tiny_dis().cuda(), tiny_dis().cuda()
    regularizers = [SpectralRegularizer(mode, interval=1), SpectralRegularizer(mode, interval=1, solve_on="cpu")]
    for call in range(3):
        for dis, sr in zip((on_gpu, solved_on_cpu), regularizers):
            sr(dis, call)
            perturb_on_device(dis, seed=call)
    for (name, expected), actual in zip(on_gpu.named_parameters(), solved_on_cpu.parameters()):
        assert actual.is_cuda
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=name)
    assert all(envelope.is_cuda for envelope in regularizers[1].ratios.values())


def perturb_on_device(dis: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in dis.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator).to(parameter.device))


def test_envelope_from_another_model_is_rejected():
    sr = SpectralRegularizer("dynamic")
    sr.load_state_dict({"mode": "dynamic", "interval": 5, "ratios": {"block1.c1": torch.ones(3)}})
    with pytest.raises(ValueError, match="block1.c1"):
        sr(tiny_dis(), 0)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="mode"):
        SpectralRegularizer("gsr")
    with pytest.raises(ValueError, match="interval"):
        SpectralRegularizer(interval=0)


def test_float64_svd_is_needed_for_exact_edits():
    """Why SR computes in float64: the same edit in float32 is ~1e4x further from numpy float64."""
    generator = torch.Generator().manual_seed(0)
    matrices = torch.randn(2, 64, 576, generator=generator)
    envelope = torch.rand(2, 64, generator=generator).sort(descending=True).values
    reference = NumpyDynamicSR()
    reference.envelope = {str(i): envelope[i].double().numpy() for i in range(2)}
    expected = np.stack(list(reference.step({str(i): matrices[i].double().numpy() for i in range(2)}).values()))
    errors = {}
    for dtype in (torch.float32, torch.float64):
        edited, _ = dynamic_compensation(matrices.to(dtype), envelope.to(dtype))
        errors[dtype] = np.abs(edited.double().numpy() - expected).max() / np.abs(expected).max()
    assert errors[torch.float64] < 1e-12
    assert 1e-8 < errors[torch.float32] < 1e-4


@pytest.mark.parametrize("shape", [(2, 64, 576), (1, 128, 64), (1, 3, 64)])
def test_gram_solver_edits_as_numpy_svd_does(shape):
    """SR's edits from the short side's Gram matrix (eigh, then U diag(s'/s) U^T W) equal numpy's SVD edits in
    float64, wide and tall weights alike, and so do the SVD solver's."""
    generator = torch.Generator().manual_seed(1)
    matrices = torch.randn(*shape, generator=generator, dtype=torch.float64)
    rank = min(shape[1:])
    envelope = torch.rand(shape[0], rank, generator=generator, dtype=torch.float64).sort(descending=True).values
    reference = NumpyDynamicSR()
    reference.envelope = {str(i): envelope[i].numpy() for i in range(shape[0])}
    expected = np.stack(list(reference.step({str(i): matrices[i].numpy() for i in range(shape[0])}).values()))
    static = np.stack([numpy_static_sr(w) for w in matrices.numpy()])
    for solver in ("gram", "svd"):
        edited, raised = dynamic_compensation(matrices, envelope, solver)
        np.testing.assert_allclose(edited.numpy(), expected, rtol=0, atol=1e-12 * np.abs(expected).max())
        np.testing.assert_allclose(raised.numpy(), np.stack(list(reference.envelope.values())), atol=1e-12)
        np.testing.assert_allclose(static_compensation(matrices, solver).numpy(), static, atol=1e-12)
    assert Factors(matrices).vh is None and Factors(matrices, "svd").vh is not None  # each took its own solver


def test_gram_solver_raises_tiny_singular_values_as_closely_as_float64_squaring_allows():
    """A weight with one direction nearly dead (s_min about 1e-5 s_1, collapse-like): dynamic SR raises it to
    s_1 R; by the Gram matrix the raised value is off by about eps64 (s_1 / s_min)^2 (1e-6), as the module says,
    and the rest of the spectrum and the static edit (which scales all small values alike) stay exact."""
    generator = torch.Generator().manual_seed(2)
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(576, 64, generator=generator, dtype=torch.float64))
    s = torch.linspace(1.0, 0.2, 64, dtype=torch.float64)
    s[-1] = 1e-5
    matrix = (u * s) @ v.T
    envelope = torch.full((1, 64), 0.1, dtype=torch.float64)  # raises the last value to 0.1 s_1, keeps the others
    edited, _ = dynamic_compensation(matrix[None], envelope)
    target = torch.maximum(s, torch.tensor(0.1, dtype=torch.float64))
    np.testing.assert_allclose(torch.linalg.svdvals(edited[0]).numpy(), target.sort(descending=True).values.numpy(),
                               rtol=1e-5)
    raised = (u[:, -1] @ edited[0] @ v[:, -1]).item()  # the dead direction's new singular value, along its vectors
    assert abs(raised / 0.1 - 1) < 1e-5
    static = static_compensation(matrix[None])[0].numpy()
    np.testing.assert_allclose(static, numpy_static_sr(matrix.numpy()), rtol=0, atol=1e-12)


def _ddp_worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    dis = tiny_dis()
    sr = SpectralRegularizer("dynamic", interval=5)
    perturb(dis, seed=100 + rank)  # ranks disagree before SR: the broadcast must make them agree
    sr(dis, 0)
    perturb(dis, seed=200 + rank)
    sr(dis, 5)
    torch.save({"params": dict(dis.named_parameters()), "sr": sr.state_dict()}, f"{out_dir}/rank{rank}.pt")
    dist.barrier()  # as train.py's ranks: none tears gloo down while another is still in a collective
    dist.destroy_process_group()
    end_finished_rank()


def test_ddp_ranks_end_with_rank0_weights(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    # rank 0's trajectory computed in one process
    dis = tiny_dis()
    sr = SpectralRegularizer("dynamic", interval=5)
    perturb(dis, seed=100)
    sr(dis, 0)
    perturb(dis, seed=200)
    sr(dis, 5)
    for name, parameter in dis.named_parameters():
        if name.endswith("original") and name.rsplit(".parametrizations", 1)[0] in CONVS:
            assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name
            torch.testing.assert_close(ranks[0]["params"][name], parameter.detach())
    for name in CONVS:
        assert torch.equal(ranks[0]["sr"]["ratios"][name], ranks[1]["sr"]["ratios"][name])
        torch.testing.assert_close(ranks[0]["sr"]["ratios"][name], sr.ratios[name])


# ---------------------------------------------------------------------------------------------
# Spectra


def test_compute_spectra_matches_svdvals_and_sn_sigma():
    dis = tiny_dis()
    dis.train()
    dis.block1.c1(torch.randn(2, 3, 8, 8))  # a training forward moves u, v away from their init
    buffers = {name: b.clone() for name, b in dis.named_buffers()}
    spectra = compute_spectra(dis)
    assert list(spectra) == sorted(CONVS + LINEARS)
    assert {name: s.kind for name, s in spectra.items()} == {
        **{name: "conv" for name in CONVS}, "l7": "linear", "l_y": "embedding"
    }
    dis.eval()
    for name, spectrum in spectra.items():
        layer = sn_layer(dis, name)
        raw = layer.parametrizations.weight.original.detach()
        expected = torch.linalg.svdvals(raw.double().reshape(raw.shape[0], -1)).numpy()
        np.testing.assert_allclose(spectrum.singular_values, expected, rtol=0, atol=1e-7 * expected[0])
        np.testing.assert_allclose(spectrum.normalized[0], 1.0)
        sn_sigma = (raw.norm() / layer.weight.detach().norm()).item()  # eval forward: W / (u^T W v)
        np.testing.assert_allclose(spectrum.sigma_hat, sn_sigma, rtol=1e-5)
    for name, b in dis.named_buffers():
        assert torch.equal(b, buffers[name]), name


def test_index_map_is_sorted_conv_order():
    assert layer_index_map(tiny_dis()) == {name: i for i, name in enumerate(CONVS)}


SRGAN_6_4 = {  # srgan.md §6.4: index order, reshaped W of the ImageNet-128 D (ch 64)
    "block1.c1": (64, 27), "block1.c2": (64, 576), "block1.c_sc": (64, 3),
    "block2.c1": (64, 576), "block2.c2": (128, 576), "block2.c_sc": (128, 64),
    "block3.c1": (128, 1152), "block3.c2": (256, 1152), "block3.c_sc": (256, 128),
    "block4.c1": (256, 2304), "block4.c2": (512, 2304), "block4.c_sc": (512, 256),
    "block5.c1": (512, 4608), "block5.c2": (1024, 4608), "block5.c_sc": (1024, 512),
    "block6.c1": (1024, 9216), "block6.c2": (1024, 9216),
}


def test_index_map_of_project_discriminator_is_srgan_6_4():
    models = pytest.importorskip("source.models")
    if not hasattr(models, "SNResNetProjectionDiscriminator"):
        pytest.skip("source.models has no SNResNetProjectionDiscriminator yet")
    dis = models.SNResNetProjectionDiscriminator(ch=64, n_classes=1000, resolution=128)
    assert layer_index_map(dis) == {name: i for i, name in enumerate(SRGAN_6_4)}
    shapes = {name: tuple(weight_matrix(layer).shape) for name, layer in spectral_norm_layers(dis).items()}
    assert shapes == {**SRGAN_6_4, "l7": (1, 1024), "l_y": (1000, 1024)}


def test_save_load_list_round_trip(tmp_path):
    dis, gen = tiny_dis(0), tiny_dis(1)
    for iteration in (10, 5):
        perturb(dis, seed=iteration)
        spectra_dis, spectra_gen = compute_spectra(dis), compute_spectra(gen)
        path = save_spectra(tmp_path, iteration, spectra_gen, spectra_dis)
        assert path == tmp_path / "spectra" / f"spectra_iter_{iteration:08d}.npz"
    assert [(it, p.name) for it, p in list_spectra(tmp_path)] == [
        (5, "spectra_iter_00000005.npz"), (10, "spectra_iter_00000010.npz")
    ]
    record = load_spectra(path)
    assert record.iteration == 5
    assert record.conv_index == {"gen": CONVS, "dis": CONVS}
    for net, expected in (("gen", spectra_gen), ("dis", spectra_dis)):
        assert list(record.nets[net]) == list(expected)
        for name, spectrum in expected.items():
            loaded = record.nets[net][name]
            assert loaded.kind == spectrum.kind and loaded.sigma_hat == spectrum.sigma_hat
            np.testing.assert_array_equal(loaded.singular_values, spectrum.singular_values)
    assert list_spectra(tmp_path / "elsewhere") == []
    assert not list(Path(tmp_path, "spectra").glob("*.partial"))


# ---------------------------------------------------------------------------------------------
# Collapse


def test_collapse_score_and_effective_rank_known_values():
    assert collapse_score(np.array([1.0, 0.5, 0.25, 0.25])) == pytest.approx(1 / 3)
    assert collapse_score(np.ones(10)) == 1.0
    with pytest.raises(ValueError):
        collapse_score(np.array([1.0]))
    assert effective_rank(np.ones(8)) == pytest.approx(8)
    assert effective_rank(np.array([3.0, 0, 0])) == pytest.approx(1)
    p = np.array([2.0, 1.0, 1.0]) / 4
    assert effective_rank(np.array([2.0, 1.0, 1.0])) == pytest.approx(np.exp(-(p * np.log(p)).sum()))


def test_layer_scores_skip_single_value_layers():
    spectra = {
        "c": LayerSpectrum("conv", np.array([2.0, 1.0, 0.5]), 2.0),
        "l7": LayerSpectrum("linear", np.array([3.0]), 3.0),
    }
    assert layer_scores(spectra) == {"c": pytest.approx(0.375)}


def fig3_like(iteration: int, rng: np.random.Generator) -> float:
    """Score path read off the README's fig3: rises to ~0.55 at 40k, then 0.45, 0.36, 0.15."""
    path = {10: 0.40, 20: 0.47, 30: 0.52, 40: 0.55, 50: 0.45, 60: 0.36, 70: 0.15}
    return path[iteration // 1000] + rng.normal(0, 0.005)


def test_detector_flags_fig3_collapse_at_70k_only():
    rng = np.random.default_rng(0)
    detector = CollapseDetector()
    flagged = {
        it: detector.update(it, {"block6.c2": fig3_like(it, rng), "block1.c1": 0.8 + rng.normal(0, 0.01)})
        for it in range(10_000, 80_000, 10_000)
    }
    assert {it: names for it, names in flagged.items() if names} == {70_000: ["block6.c2"]}
    assert detector.peaks["block6.c2"][1] == 40_000


def test_detector_ignores_noisy_stable_scores_and_respects_filters():
    rng = np.random.default_rng(1)
    detector = CollapseDetector(threshold=0.5, min_layers=2, layers=r"^block[56]")
    for it in range(0, 100_000, 1000):
        scores = {"block5.c1": 0.8 + rng.normal(0, 0.08), "block6.c2": 0.8 + rng.normal(0, 0.08), "block1.c1": 0.8}
        assert detector.update(it, scores) == []
    assert detector.update(100_000, {"block5.c1": 0.1, "block6.c2": 0.8, "block1.c1": 0.01}) == []  # 1 < min_layers
    assert sorted(detector.update(101_000, {"block5.c1": 0.1, "block6.c2": 0.1})) == ["block5.c1", "block6.c2"]
    assert "block1.c1" not in detector.peaks


def test_detector_defaults_validation_filter_and_edges():
    detector = CollapseDetector()  # the default threshold: half the running maximum, strictly below it
    detector.update(0, {"a": 0.75, "b": 0.75, "c": 0.75})
    assert detector.update(1, {"a": 0.36, "b": 0.375, "c": 0.39}) == ["a"]
    for threshold in (0, 1, 1.5):
        with pytest.raises(ValueError, match="threshold"):
            CollapseDetector(threshold=threshold)
    searched = CollapseDetector(layers="c2")  # searched anywhere in the name, not matched from its start
    searched.update(0, {"block6.c2": 0.8, "block6.c1": 0.8})
    assert list(searched.peaks) == ["block6.c2"]
    assert layer_scores({"c": LayerSpectrum("conv", np.array([2.0, 1.0]), 2.0)}) == {"c": 0.5}  # two values: a score


def test_detector_state_round_trip():
    detector = CollapseDetector()
    detector.update(1, {"a": 0.8})
    restored = CollapseDetector()
    restored.load_state_dict(torch.load(io.BytesIO(_saved(detector.state_dict()))))
    assert restored.update(2, {"a": 0.3}) == ["a"]


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()
