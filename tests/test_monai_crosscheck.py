"""Our network blocks and losses against MONAI's (the reference implementations of the field).

RegStation keeps its own versions where it needs control that MONAI's do not give: an ITK-like
boundary rule for image warps, ``border`` padding inside scaling and squaring, local NCC whose
border windows average over the voxels inside the image, fields in physical space at the module
boundary. Where the two definitions coincide (interior voxels, fields that vanish at the border,
polynomial fields on which both finite-difference stencils are exact) they must agree: these tests
check that they do.
"""
import pytest
import torch

monai = pytest.importorskip("monai")

from monai.losses import BendingEnergyLoss, DiceLoss, GlobalMutualInformationLoss, LocalNormalizedCrossCorrelationLoss  # noqa: E402
from monai.networks.blocks import DVF2DDF, Warp  # noqa: E402

from app.engine.nn import layers, losses  # noqa: E402
from app.engine.spatial import warp_torch  # noqa: E402


def _smooth(shape, seed, margin=0, scale=1.0):
    """A smooth random field (B, C, D, H, W), zero within ``margin`` voxels of every face."""
    g = torch.Generator().manual_seed(seed)
    b, c, *sp = shape
    coarse = torch.randn((b, c, *[max(2, s // 4) for s in sp]), generator=g, dtype=torch.float64)
    out = torch.nn.functional.interpolate(coarse, size=sp, mode="trilinear", align_corners=True) * scale
    if margin:
        mask = torch.zeros(sp, dtype=torch.float64)
        mask[margin:-margin, margin:-margin, margin:-margin] = 1
        out = out * mask
    return out


def test_lncc_matches_monai_away_from_the_border():
    # zero margins of 2 half-windows: there the two border rules (mean over inside voxels / zero padding) agree
    a = _smooth((2, 1, 24, 26, 28), 0, margin=6).abs()
    b = (a + 0.3 * _smooth((2, 1, 24, 26, 28), 1, margin=6)).abs()
    for w in (3, 5, 7):
        # the stabilisers differ (MONAI clamps the variances, ours adds eps): make both negligible
        ref = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=w, kernel_type="rectangular",
                                                  smooth_nr=0.0, smooth_dr=1e-12)(b, a)
        ours = losses.lncc(a, b, window=w, eps=1e-14)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_bending_energy_matches_monai_on_quadratic_fields():
    # both stencils (ours compact, MONAI's a twice-applied central difference) are exact on quadratics
    z, y, x = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in (12, 13, 14)], indexing="ij")
    g = torch.Generator().manual_seed(3)
    comps = []
    for _ in range(3):
        c = torch.randn(10, generator=g, dtype=torch.float64)
        comps.append(c[0] * z * z + c[1] * y * y + c[2] * x * x + c[3] * z * y + c[4] * y * x + c[5] * z * x
                     + c[6] * z + c[7] * y + c[8] * x + c[9])
    u = torch.stack(comps)[None] * 1e-2
    ref = BendingEnergyLoss(normalize=False)(u)
    torch.testing.assert_close(losses.bending_energy(u), ref, rtol=1e-9, atol=1e-12)


def test_scaling_and_squaring_matches_monai_dvf2ddf():
    v = _smooth((1, 3, 24, 24, 24), 4, margin=6, scale=3.0).float()  # zero near the border
    ref = DVF2DDF(num_steps=7, mode="bilinear", padding_mode="border")(v)
    torch.testing.assert_close(layers.integrate_velocity(v, 7), ref, rtol=1e-4, atol=1e-4)


def test_warp_matches_monai_warp():
    img = _smooth((2, 2, 16, 18, 20), 5).float()
    ddf = _smooth((2, 3, 16, 18, 20), 6, scale=2.5).float()
    ref = Warp(mode="bilinear", padding_mode="border")(img, ddf)
    torch.testing.assert_close(warp_torch(img, ddf, "bilinear", "border"), ref, rtol=1e-5, atol=1e-5)


def test_dice_loss_matches_monai():
    g = torch.Generator().manual_seed(7)
    fixed = (torch.rand(2, 5, 8, 9, 10, generator=g) > 0.6).float()
    warped = torch.rand(2, 5, 8, 9, 10, generator=g)
    ref = DiceLoss(include_background=True, smooth_nr=1e-5, smooth_dr=1e-5)(warped, fixed)
    torch.testing.assert_close(losses.dice_loss(fixed, warped, eps=1e-5), ref, rtol=1e-6, atol=1e-7)


def test_mutual_information_tracks_monai():
    # Parzen-window MI estimators differ in their window normalisation; both must rank alignments alike
    a = _smooth((1, 1, 24, 24, 24), 8).float()
    a = (a - a.min()) / (a.max() - a.min())
    ref_fn = GlobalMutualInformationLoss(kernel_type="gaussian", num_bins=32, sigma_ratio=0.5)
    rows = []
    for k, noise in enumerate((0.0, 0.1, 0.3, 0.6)):
        b = (a + noise * torch.rand(a.shape, generator=torch.Generator().manual_seed(k))).clamp(0, 1)
        rows.append((float(losses.mutual_information(a, b, bins=32, max_samples=None)), float(ref_fn(b, a))))
    ours, ref = zip(*rows)
    assert list(ours) == sorted(ours) and list(ref) == sorted(ref)      # worse alignment, higher loss
