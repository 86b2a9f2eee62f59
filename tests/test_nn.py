"""Layers, networks and losses of app.engine.nn: hand-computable cases and float64 gradchecks."""
import numpy as np
import pytest
import torch

from app.engine import spatial
from app.engine.nn import layers, losses
from app.engine.nn.similarity import get_similarity
from app.engine.nn.networks import AffineNet, DeformableNet, TwoStageNet, build_model


def smooth_disp(shape, amp, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, 3, 3, 3, generator=g, dtype=dtype)
    return torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True) * amp


# ----------------------------------------------------------------------------- layers
def test_zero_velocity_gives_zero_displacement():
    v = torch.zeros(2, 3, 5, 6, 7)
    assert torch.equal(layers.integrate_velocity(v, 7), v)


def test_integrate_constant_velocity_is_translation():
    v = torch.zeros(1, 3, 8, 8, 8, dtype=torch.float64)
    v[:, 2] = 1.5                       # constant shift along x: exp(v) = translation
    d = layers.integrate_velocity(v, 6)
    torch.testing.assert_close(d, v, atol=1e-10, rtol=0)


def test_integrate_velocity_inverse_cancels():
    v = smooth_disp((10, 10, 10), 0.5)
    fwd = layers.integrate_velocity(v, 7)
    inv = layers.integrate_velocity(-v, 7)
    # phi_v o phi_-v = id: fwd(x) + inv(x + fwd(x))... interior only (borders are padded)
    comp = fwd + spatial.warp_torch(inv, fwd, "bilinear", "border")
    err = comp[..., 2:-2, 2:-2, 2:-2].abs()
    assert err.mean() < 0.01 and err.max() < 0.05   # interpolation error only


def test_integrate_velocity_gradcheck():
    v = (smooth_disp((4, 4, 4), 0.6, seed=1)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: layers.integrate_velocity(x, 3), (v,), eps=1e-6, atol=1e-5)


def test_warp_gradcheck_image_and_displacement():
    g = torch.Generator().manual_seed(2)
    img = torch.rand(1, 2, 4, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    # keep samples off voxel faces (trilinear is not differentiable exactly on integers)
    disp = (0.3 + 0.2 * torch.rand(1, 3, 4, 5, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    st = layers.SpatialTransformer(padding_mode="zeros")
    assert torch.autograd.gradcheck(st, (img, disp), eps=1e-6, atol=1e-6)


def test_spatial_transformer_shift_by_one_voxel():
    img = torch.zeros(1, 1, 3, 3, 4)
    img[0, 0, 1, 1, 2] = 1.0
    disp = torch.zeros(1, 3, 3, 3, 4)
    disp[:, 2] = 1.0                   # out(i) = img(i + 1 along x)
    out = layers.SpatialTransformer()(img, disp)
    assert out[0, 0, 1, 1, 1] == 1.0 and out.sum() == 1.0


def test_resize_field_keeps_physical_length():
    d = torch.zeros(1, 3, 4, 5, 6)
    d[:, 0], d[:, 1], d[:, 2] = 1.0, 2.0, -1.0
    up = layers.resize_field(d, (8, 10, 12))
    torch.testing.assert_close(up[0, :, 3, 3, 3], torch.tensor([2.0, 4.0, -2.0]))


def test_affine_index_map_identity_and_shift():
    m = torch.eye(4)[None]
    m[0, 2, 3] = 0.5
    idx = layers.affine_index_map(m, (2, 3, 4))
    grid = spatial.identity_index_grid((2, 3, 4))
    torch.testing.assert_close(idx[:, :2], grid[:, :2])
    torch.testing.assert_close(idx[:, 2], grid[:, 2] + 0.5)


def test_layer_shape_errors():
    with pytest.raises(ValueError, match=r"\(1, 2, 4, 4, 4\)"):
        layers.integrate_velocity(torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(ValueError):
        layers.affine_index_map(torch.zeros(1, 2, 4), (2, 2, 2))


# ----------------------------------------------------------------------------- losses
@pytest.mark.parametrize("nd", [2, 3])
def test_similarity_losses_identical_images(nd):
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 1, *([12] * nd), generator=g)
    assert losses.mse(a, a) == 0
    assert losses.lncc(a, a, 5) < -0.99
    assert losses.lncc(a, torch.rand(a.shape, generator=g), 5) > -0.3
    assert losses.mutual_information(a, a) < losses.mutual_information(a, torch.rand(a.shape, generator=g))


def test_mse_by_hand():
    a = torch.zeros(1, 1, 2, 2)
    b = torch.zeros(1, 1, 2, 2)
    b[0, 0, 0, 0] = 2.0
    assert losses.mse(a, b).item() == pytest.approx(1.0)


def test_lncc_invariant_to_affine_intensity():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(1, 1, 10, 10, 10, generator=g)
    assert losses.lncc(a, 3 * a + 1, 5).item() == pytest.approx(-1.0, abs=1e-3)



@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("window", [1, 3, 5])
def test_box_mean_matches_avg_pool_with_clipped_border_windows(nd, window):
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, *([6, 7, 8][:nd]), generator=g, dtype=torch.float64)
    pool = torch.nn.functional.avg_pool3d if nd == 3 else torch.nn.functional.avg_pool2d
    ref = pool(x, window, stride=1, padding=window // 2, count_include_pad=False)
    assert torch.allclose(losses.box_mean(x, window), ref, rtol=0, atol=1e-12)


def test_box_mean_by_hand_on_an_image_narrower_than_the_window():
    x = torch.tensor([[[[1.0, 2.0, 6.0]]]])                   # (1, 1, 1, 3): windows clip to the image
    out = losses.box_mean(x, 5)
    assert out.flatten().tolist() == pytest.approx([3.0, 3.0, 3.0])
    with pytest.raises(ValueError, match="odd"):
        losses.box_mean(x, 4)


def test_lncc_with_precomputed_moments_and_the_cached_similarity():
    g = torch.Generator().manual_seed(5)
    a = torch.rand(1, 1, 9, 10, 11, generator=g)
    b = torch.rand(1, 1, 9, 10, 11, generator=g)
    plain = losses.lncc(a, b, 5)
    assert losses.lncc(a, b, 5, a_moments=losses.lncc_moments(a, 5)).item() == pytest.approx(plain.item(), abs=1e-7)
    with pytest.raises(ValueError, match="a_moments"):
        losses.lncc(a, b, 5, a_moments=losses.lncc_moments(a[..., :5], 5))
    sim = get_similarity("lncc", window=5)
    assert sim(a, b).item() == pytest.approx(plain.item(), abs=1e-7)
    assert sim(a, b).item() == pytest.approx(plain.item(), abs=1e-7)      # from the cached moments
    a.mul_(0.5).add_(b * 0.5)                                              # in place: the cache must notice
    assert sim(a, b).item() == pytest.approx(losses.lncc(a, b, 5).item(), abs=1e-7)

def test_dice_loss_by_hand():
    f = torch.zeros(1, 1, 2, 2)
    w = torch.zeros(1, 1, 2, 2)
    f[0, 0, 0, :] = 1      # 2 voxels
    w[0, 0, :, 0] = 1      # 2 voxels, 1 shared -> Dice 0.5
    assert losses.dice_loss(f, w, eps=0).item() == pytest.approx(0.5)
    assert losses.dice_loss(f, f).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("nd", [2, 3])
def test_regularisers_by_hand(nd):
    shape = [7] * nd
    coords = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij")
    lin = torch.zeros(1, nd, *shape, dtype=torch.float64)
    lin[0, 0] = 0.5 * coords[-1]                          # slope 0.5 along the last axis
    assert losses.gradient_l2(lin).item() == pytest.approx(0.25 / nd / nd)
    assert losses.bending_energy(lin).item() == pytest.approx(0.0, abs=1e-12)
    quad = torch.zeros(1, nd, *shape, dtype=torch.float64)
    quad[0, 0] = coords[0] ** 2
    assert losses.bending_energy(quad).item() == pytest.approx(4.0 / nd)
    assert losses.gradient_l2(torch.zeros_like(quad)) == 0


def test_losses_gradcheck():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(1, 1, 5, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.rand(1, 1, 5, 5, 5, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: losses.lncc(x, b, 3), (a,))
    assert torch.autograd.gradcheck(lambda x: losses.mutual_information(x, b, bins=8), (a,))
    d = torch.rand(1, 3, 5, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(losses.bending_energy, (d,))
    assert torch.autograd.gradcheck(losses.gradient_l2, (d,))


def test_loss_shape_errors():
    with pytest.raises(ValueError, match=r"\(1, 1, 4, 4\).*\(1, 1, 4, 5\)"):
        losses.mse(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError):
        losses.lncc(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), window=4)
    with pytest.raises(ValueError):
        losses.gradient_l2(torch.zeros(1, 2, 4, 4, 4))


# ----------------------------------------------------------------------------- networks
def test_affine_net_is_identity_at_init():
    net = AffineNet()
    theta = net(torch.rand(2, 1, 20, 24, 28), torch.rand(2, 1, 20, 24, 28))
    expected = torch.cat([torch.eye(3), torch.zeros(3, 1)], 1).expand(2, 3, 4)
    torch.testing.assert_close(theta, expected)


@pytest.mark.parametrize("diffeo", [False, True])
def test_deformable_net_shapes_and_near_zero_init(diffeo):
    net = DeformableNet(enc=(4, 8, 8), dec=(8, 8), out_level=1, diffeomorphic=diffeo, int_steps=4)
    out = net(torch.rand(1, 1, 9, 12, 10), torch.rand(1, 1, 9, 12, 10))
    assert out.disp_vox.shape == (1, 3, 9, 12, 10)
    assert out.raw_vox.shape == (1, 3, 5, 6, 5)
    assert out.disp_vox.abs().max() < 1e-2


def test_models_rebuild_from_config():
    net = TwoStageNet({"kind": "affine", "channels": [4, 4]},
                      {"kind": "deformable", "enc": [4, 8], "dec": [8], "out_level": 1, "diffeomorphic": True})
    again = build_model(net.config)
    again.load_state_dict(net.state_dict(), strict=True)
    assert again.config == net.config
    with pytest.raises(ValueError):
        build_model({"kind": "nope"})
    with pytest.raises(ValueError):
        build_model({"kind": "deformable", "bogus": 1})
    with pytest.raises(ValueError, match="decoder"):
        DeformableNet(enc=(4, 8, 8), dec=(8,), out_level=0)


def test_flow_affine_net_identity_at_init_and_exact_fit():
    from app.engine.nn.networks import FlowAffineNet
    net = FlowAffineNet(enc=(4, 8), dec=(8, 8), out_level=0, input_pool=2, spacing_mm=4.0)
    theta = net(torch.rand(1, 1, 9, 12, 10), torch.rand(1, 1, 9, 12, 10))
    ident = torch.cat([torch.eye(3), torch.zeros(3, 1)], 1).double()
    torch.testing.assert_close(theta[0], ident, atol=1e-3, rtol=0)
    # a displacement that is exactly affine is fitted exactly (up to the tiny ridge)
    full, pooled = (9, 12, 10), (5, 6, 5)
    lin = torch.tensor([[1.05, 0.02, 0.0], [0.0, 0.97, 0.03], [0.01, 0.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([3.0, -2.0, 5.0], dtype=torch.float64)
    axes = []
    for nf, nc in zip(full, pooled):           # centres of avg_pool(2, ceil_mode) cells, centred mm
        i = torch.arange(nc, dtype=torch.float64)
        axes.append(((2 * i + torch.clamp(2 * i + 2, max=nf) - 1) / 2 - (nf - 1) / 2) * 4.0)
    q = torch.stack(torch.meshgrid(*axes, indexing="ij"), 0).reshape(3, -1)
    u = ((lin @ q + t[:, None] - q) / 8.0).reshape(1, 3, *pooled)
    fit = net.fit(u, torch.ones(1, 1, *pooled), full)[0]
    torch.testing.assert_close(fit, torch.cat([lin, t[:, None]], 1), atol=2e-3, rtol=0)


def test_recursive_affine_iterations_compose():
    """With an untrained (identity) affine net, any number of iterations leaves the initial transform."""
    from app.engine.nn.twostage import PairTensors, run_two_stage
    net = TwoStageNet({"kind": "affine", "channels": [4, 4]}, {"kind": "deformable", "enc": [4, 8], "dec": [8]},
                      affine_iterations=3)
    assert build_model(net.config).affine_iterations == 3
    eye = np.eye(4)
    init = eye.copy()
    init[:3, 3] = [1.0, -2.0, 0.5]
    img = np.random.default_rng(0).random((8, 10, 12)).astype(np.float32)
    pair = PairTensors.from_numpy([img], [img], [eye], [eye], [eye], [init])
    with torch.no_grad():
        out = run_two_stage(net, pair, deformable=False)
    np.testing.assert_allclose(out.affine[0].numpy(), init, atol=1e-6)
    with pytest.raises(ValueError):
        TwoStageNet(affine_iterations=0)
