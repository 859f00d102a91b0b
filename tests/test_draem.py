"""model=draem: its Perlin masks, synthetic anomalies, SSIM and focal losses, a training step, its anomaly map and
image score, and its refusal to sample."""

import math

import pytest
import torch
import torch.nn.functional as F

from genlab.data import Batch
from genlab.errors import GenlabError
from genlab.models import DRAEM
from genlab.models.draem import (band_masks, crack_masks, focal_loss, hole_masks, perlin_masks, perlin_noise, pool_size, pooled_max, ssim,
                                 synthetic_anomalies)
from genlab.nets.draem import DRAEMDiscriminative, DRAEMReconstructive
from genlab.parts import load_model
from genlab.sampling import draw
from genlab.step import StepContext

from conftest import compose_train, first_batch, make_trainer


def small(channels=1, size=32) -> DRAEM:
    return DRAEM(DRAEMReconstructive(channels, size, 8), DRAEMDiscriminative(channels, size, 8))


def test_perlin_noise_shape_and_spread():
    torch.manual_seed(0)
    n = perlin_noise(64, 64, 48, max_log2=3)
    assert n.shape == (64, 64, 48) and n.isfinite().all()
    assert n.abs().max() <= 1.0 + 1e-5 and n.min() < -0.5 and n.max() > 0.5 and 0.15 < n.std() < 0.5
    assert (n.flatten(1).std(1) > 0).float().mean() > 0.9  # nearly every draw varies over the image


def test_perlin_masks_cover_a_plausible_share_and_follow_the_seed():
    torch.manual_seed(0)
    m = perlin_masks(400, 64, 64, max_log2=3)
    assert m.shape == (400, 1, 64, 64) and set(m.unique().tolist()) <= {0.0, 1.0}
    cover = m.flatten(1).mean(1)
    # DRAEM's threshold of 0.5 on sqrt(2)-scaled Perlin noise keeps about 5 % of the pixels on average (measured
    # 5.1 % at 64 and 256 pixels), not the 10 to 70 % one might guess: its anomalies are small
    assert 0.02 < cover.mean() < 0.2
    assert (cover == 0).float().mean() < 0.3 and (cover > 0.1).any()  # some empty, some large
    torch.manual_seed(5)
    a = perlin_masks(8, 32, 32, 2)
    torch.manual_seed(5)
    assert torch.equal(a, perlin_masks(8, 32, 32, 2))
    assert not torch.equal(a, perlin_masks(8, 32, 32, 2))


def test_synthetic_anomaly_changes_the_mask_and_nothing_else():
    torch.manual_seed(1)
    x = torch.rand(16, 3, 32, 32)
    x_aug, m = synthetic_anomalies(x, p_anomaly=1.0, max_log2=2)
    assert x_aug.shape == x.shape and m.shape == (16, 1, 32, 32)
    outside = (m == 0).expand_as(x)
    assert torch.equal(x_aug[outside], x[outside])
    inside = (m > 0).expand_as(x)
    assert inside.sum() > 0 and (x_aug[inside] != x[inside]).float().mean() > 0.95
    assert x_aug.min() >= 0 and x_aug.max() <= 1
    x_aug, m = synthetic_anomalies(x, p_anomaly=0.0, max_log2=2)
    assert torch.equal(x_aug, x) and not m.any()
    torch.manual_seed(2)  # drawn from torch's generator alone: a resumed run draws the same anomalies
    a = synthetic_anomalies(x, 0.5, 2)
    torch.manual_seed(2)
    assert all(torch.equal(u, v) for u, v in zip(a, synthetic_anomalies(x, 0.5, 2)))


def test_defect_shaped_masks_are_thin_cracks_and_small_holes():
    """model.masks=defects: cracks one or two pixels wide (a 3x3 erosion leaves almost nothing of them, where it
    leaves most of a Perlin blob), holes no wider than side/12 in radius, and both inside the image."""
    torch.manual_seed(0)
    cracks, holes, blobs = crack_masks(64, 64, 64), hole_masks(64, 64, 64), perlin_masks(64, 64, 64, 3)

    def kept_by_erosion(m):
        return (-F.max_pool2d(-m, 3, 1, 1)).sum() / m.sum()

    assert cracks.sum((1, 2, 3)).min() >= 10 and kept_by_erosion(cracks) < 0.1 < 0.5 < kept_by_erosion(blobs)
    assert holes.sum((1, 2, 3)).min() >= 4 and holes.sum((1, 2, 3)).max() <= 3 * math.pi * (64 / 12 + 1) ** 2
    assert set(cracks.unique().tolist()) == set(holes.unique().tolist()) == {0.0, 1.0}
    with pytest.raises(GenlabError, match="model.masks=stars is not one of perlin, defects, surface"):
        DRAEM(DRAEMReconstructive(1, 16, 8), DRAEMDiscriminative(1, 16, 8), masks="stars")


def test_band_masks_run_from_one_edge_and_the_surface_set_draws_every_kind():
    """model.masks=surface adds bands: each covers one whole edge of the image and a tenth to half of it, its
    boundary within a twentieth of the side of straight; a fifth of the masks are bands."""
    torch.manual_seed(0)
    bands = band_masks(200, 64, 64)
    edges = torch.stack([bands[:, 0, 0, :], bands[:, 0, -1, :], bands[:, 0, :, 0], bands[:, 0, :, -1]], 1).all(-1)
    assert edges.sum(1).eq(1).all() and edges.float().mean(0).min() > 0.15  # one edge each, all four used
    share = bands.mean((1, 2, 3))
    assert share.min() >= 0.1 - 0.05 and share.max() <= 0.5 + 0.05 and share.std() > 0.08
    tall = band_masks(50, 32, 48)  # not square: from the top or the bottom
    assert (tall[:, 0, 0, :].all(-1) | tall[:, 0, -1, :].all(-1)).all()
    x = torch.rand(400, 1, 32, 32)
    _, m = synthetic_anomalies(x, p_anomaly=1.0, max_log2=2, masks="surface")
    full_edge = torch.stack([m[:, 0, 0, :], m[:, 0, -1, :], m[:, 0, :, 0], m[:, 0, :, -1]], 1).all(-1).any(1)
    assert 0.15 < full_edge.float().mean() < 0.3  # the bands' fifth (a Perlin blob rarely covers an edge)


def test_ssim_of_identical_images_is_one_and_drops_for_noise():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32)
    assert torch.allclose(ssim(x, x), torch.ones(4), atol=1e-5)
    assert torch.allclose(ssim(x.mean(1, keepdim=True), x.mean(1, keepdim=True)), torch.ones(4), atol=1e-5)
    ramp = torch.linspace(0.2, 0.8, 32).expand(4, 3, 32, 32)  # smooth: noise is all the structure there is
    s = ssim(ramp, ramp + 0.1 * torch.randn_like(ramp))
    assert s.shape == (4,) and (s < 0.5).all()
    assert (ssim(ramp, ramp + 0.02 * torch.randn_like(ramp)) > s).all()  # less noise, more alike
    assert (ssim(x, (x + 0.2 * torch.randn_like(x)).clamp(0, 1)) < 0.9).all()


def test_focal_loss_is_cross_entropy_at_gamma_zero_and_forgives_confident_pixels():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 2, 8, 8), torch.randint(0, 2, (2, 8, 8))
    assert torch.allclose(focal_loss(logits, target, gamma=0.0), F.cross_entropy(logits, target), atol=1e-6)
    assert focal_loss(logits, target, gamma=2.0) < F.cross_entropy(logits, target)
    # a confident right pixel (p = 0.9): weighted by (1 - 0.9)^2 = 0.01 of its cross-entropy
    sure = torch.stack([torch.zeros(2, 8, 8), torch.full((2, 8, 8), math.log(9.0))], 1)
    ones = torch.ones(2, 8, 8, dtype=torch.long)
    assert torch.allclose(focal_loss(sure, ones), 0.01 * F.cross_entropy(sure, ones), rtol=1e-4)


@pytest.mark.parametrize("channels,size", [(1, 32), (3, 32), (1, 28)])
def test_training_step_changes_every_part(channels, size, tmp_path):
    trainer = make_trainer(["model=draem", "dataset=synthetic", "dataset.n=16", f"dataset.channels={channels}",
                            f"dataset.image_size={size}", "trainer.batch_size=8", "model.reconstructive.width=8",
                            "model.discriminative.width=8", "model.p_anomaly=1.0"], tmp_path)
    m = trainer.model
    assert isinstance(m, DRAEM) and trainer.ctx.optimizers["draem"].param_groups[0]["lr"] == 1e-4
    before = {k: p.detach().clone() for k, p in m.named_parameters()}
    torch.manual_seed(0)
    out = m.training_step(first_batch(trainer), trainer.ctx)
    assert set(out) == {"loss", "recon", "ssim", "focal"}
    assert all(v.dim() == 0 and math.isfinite(v.item()) and not v.requires_grad for v in out.values())
    assert math.isclose(out["loss"].item(), out["recon"].item() + out["ssim"].item() + out["focal"].item(), rel_tol=1e-5)
    unchanged = [k for k, p in m.named_parameters() if torch.equal(p, before[k])]
    assert not unchanged, f"not updated by one step: {unchanged}"


def test_a_few_dozen_steps_reduce_the_focal_loss():
    """Flat grey 32x32 images with a little noise: the segmentation learns where the pasted anomalies are."""
    torch.manual_seed(0)
    m = small()
    ctx = StepContext({"draem": torch.optim.Adam(m.parameters(), lr=1e-3)})
    g = torch.Generator().manual_seed(1)
    data = (0.5 + 0.05 * torch.randn(64, 1, 32, 32, generator=g)).clamp(0, 1)
    focal = []
    for step in range(30):
        ctx.begin(step)
        out = m.training_step(Batch(data[torch.randint(0, 64, (8,), generator=g)], torch.zeros(8, dtype=torch.long)), ctx)
        ctx.end()
        focal.append(out["focal"].item())
    assert sum(focal[-10:]) / 10 < 0.6 * sum(focal[:5]) / 5, focal


def test_anomaly_map_and_score_shapes_and_evaluation_changes_nothing():
    torch.manual_seed(0)
    m = small(3, 32).eval()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.rand(5, 3, 32, 32)
    with torch.inference_mode():
        amap, score = m.anomaly_map(x), m.anomaly_score(x)
        assert m.reconstruct(x).shape == x.shape and 0 <= m.reconstruct(x).min() <= m.reconstruct(x).max() <= 1
        assert m.anomaly_score(x, "mse").shape == (5,) and m.anomaly_score(x, "mse_blur").shape == (5,)
        assert m.anomaly_map(x, "mse").shape == (5, 1, 32, 32)  # genlab's scores' per-pixel forms too
    assert amap.shape == (5, 1, 32, 32) and amap.min() >= 0 and amap.max() <= 1
    assert score.shape == (5,) and torch.allclose(score, pooled_max(amap, m.pool))
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    smooth = DRAEM(m.reconstructive, m.discriminative, smooth=1.0).eval()
    with torch.inference_mode():
        blurred = smooth.anomaly_map(x)
    assert blurred.shape == amap.shape and not torch.equal(blurred, amap)


def test_the_image_score_is_the_pooled_maximum_of_a_hand_built_map():
    amap = torch.zeros(3, 1, 32, 32)
    amap[0, 0, 10:13, 20:23] = 1.0  # a 3x3 square: at most 9 of a 5x5 window's 25 pixels
    amap[1, 0, 0, 0] = 1.0  # one corner pixel: 1 of 25 (the window's outside counts as 0, as in DRAEM)
    amap[2] = 0.25  # even: the inside's windows all average 0.25
    assert torch.allclose(pooled_max(amap, 5), torch.tensor([9 / 25, 1 / 25, 0.25]))
    assert [pool_size(s) for s in (256, 128, 64, 32, 28)] == [21, 11, 5, 3, 3]
    m = small()
    m.anomaly_map = lambda x, score=None: amap  # the score is computed from the map alone
    assert m.pool == 3 and torch.allclose(m.anomaly_score(torch.zeros(3, 1, 32, 32)), torch.tensor([1.0, 1 / 9, 0.25]))


def test_it_refuses_to_sample_in_one_clear_line():
    m = small()
    with pytest.raises(GenlabError, match="draws no images"):
        draw(m, n=4)
    with pytest.raises(GenlabError, match="draws no images"):
        m.sample(2)


def test_config_and_settings_checks():
    cfg = compose_train(["model=draem"])
    assert cfg.loss is None and cfg.optimizer.lr == 1e-4 and list(cfg.optimizer.betas) == [0.9, 0.999]
    assert cfg.model.reconstructive.channels == cfg.dataset.channels
    with pytest.raises(GenlabError, match="same channels and image_size"):
        DRAEM(DRAEMReconstructive(1, 32), DRAEMDiscriminative(3, 32))
    with pytest.raises(GenlabError, match="odd"):
        DRAEM(DRAEMReconstructive(1, 32), DRAEMDiscriminative(1, 32), pool=4)


def test_a_run_trains_and_its_checkpoint_scores(tmp_path):
    """The real loop for two steps (the sample grids skip a model that draws no images), then the model rebuilt
    from its checkpoint alone."""
    trainer = make_trainer(["model=draem", "dataset=synthetic", "dataset.n=16", "dataset.image_size=32",
                            "trainer.batch_size=8", "trainer.max_steps=2", "model.reconstructive.width=8",
                            "model.discriminative.width=8"], tmp_path)
    trainer.fit()
    model, cfg, state = load_model(tmp_path / "checkpoints" / "last.pt")
    assert isinstance(model, DRAEM) and state["step"] == 2 and not model.training
    x = torch.rand(3, 1, 32, 32)
    with torch.inference_mode():
        assert model.anomaly_score(x).shape == (3,) and model.anomaly_map(x).shape == (3, 1, 32, 32)


def test_score_and_map_come_from_one_pass_and_agree_with_each_alone():
    from genlab.scores import score_for

    torch.manual_seed(0)
    model = DRAEM(DRAEMReconstructive(1, 32, width=8), DRAEMDiscriminative(1, 32, width=8)).eval()
    x = torch.rand(3, 1, 32, 32)
    with torch.inference_mode():
        for name in ("segmentation", "mse_blur"):
            score = score_for(model, name)
            s, m = score.score_and_map(model, x)
            assert torch.allclose(s, score(model, x)) and torch.allclose(m, score.map(model, x)), name
