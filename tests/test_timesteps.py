import numpy as np
import pytest
import torch
from scipy import stats

from utils.diffusion.timesteps import CategoricalTimestepSampler, adaptation_weights, retention_weights
from utils.methods.deme import GLOBAL_SAMPLE_MODES, RangeTimestepSampler, timestep_ranges

T = 1000
u = np.arange(1, T + 1) / T


@pytest.mark.parametrize("tau", [0.3, 0.5, 1.0, 1.5, 2.0])
def test_weights_equal_formulas(tau):
    np.testing.assert_allclose(adaptation_weights(T, tau).numpy(), u**tau, rtol=1e-12)
    np.testing.assert_allclose(retention_weights(T, tau, "paper").numpy(), 1 - u**tau, rtol=1e-12, atol=1e-15)
    # the official code's weights, literally: (T - t)^tau for t = 0..T-1, normalised (psi reversed)
    official = np.arange(T, 0, -1, dtype=np.float64) ** tau
    xi = retention_weights(T, tau, "official").numpy()
    np.testing.assert_allclose(xi / xi.sum(), official / official.sum(), rtol=1e-12)
    np.testing.assert_allclose(xi, adaptation_weights(T, tau).numpy()[::-1], rtol=1e-12)
    assert xi[-1] > 0  # t = T-1 keeps weight, as in the official code


def test_forms_differ_by_one_step_at_tau_1_and_more_elsewhere():
    paper, official = retention_weights(T, 1.0, "paper"), retention_weights(T, 1.0, "official")
    np.testing.assert_allclose(official[1:].numpy(), paper[:-1].numpy(), rtol=1e-12)  # shifted by one step
    assert paper[-1] == 0 and official[-1] > 0
    assert not torch.allclose(retention_weights(T, 0.5, "paper"), retention_weights(T, 0.5, "official"))


def test_snr_weighting():
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    snr = abar / (1 - abar)
    psi = adaptation_weights(T, weighting="snr", alphas_cumprod=abar)
    np.testing.assert_allclose(psi.numpy(), (1 / (1 + snr)).numpy(), rtol=1e-10)
    np.testing.assert_allclose(retention_weights(T, weighting="snr", alphas_cumprod=abar).numpy(),
                               (1 - 1 / (1 + snr)).numpy(), rtol=1e-10)


def test_tau_zero_is_uniform():
    assert torch.all(adaptation_weights(T, 0.0) == 1)
    counts = np.bincount(CategoricalTimestepSampler(adaptation_weights(T, 0.0)).sample(
        200_000, torch.Generator().manual_seed(1)).numpy(), minlength=T)
    assert stats.chisquare(counts).pvalue > 1e-3


@pytest.mark.parametrize("kind,tau,form", [("psi", 1.0, None), ("psi", 0.5, None), ("xi", 1.0, "paper"),
                                           ("xi", 1.5, "paper"), ("xi", 0.5, "official")])
def test_samples_match_distribution(kind, tau, form):
    w = adaptation_weights(T, tau) if kind == "psi" else retention_weights(T, tau, form)
    draws = CategoricalTimestepSampler(w).sample(200_000, torch.Generator().manual_seed(0)).numpy()
    assert draws.min() >= 0 and draws.max() < T
    # Chi-square on 20 bins of 50 timesteps (expected counts well above 5 except where the weight vanishes).
    p = (w / w.sum()).numpy().reshape(20, 50).sum(1)
    observed = np.bincount(draws // 50, minlength=20)
    keep = p * len(draws) > 5
    expected = p[keep] / p[keep].sum() * observed[keep].sum()
    assert stats.chisquare(observed[keep], expected).pvalue > 1e-3
    # ...and a distribution with the wrong tau is rejected by the same test, so the test can fail.
    wrong = adaptation_weights(T, tau + 1.0) if kind == "psi" else retention_weights(T, tau + 1.0, form)
    q = (wrong / wrong.sum()).numpy().reshape(20, 50).sum(1)[keep]
    assert stats.chisquare(observed[keep], q / q.sum() * observed[keep].sum()).pvalue < 1e-6


def test_bad_weights_rejected():
    with pytest.raises(ValueError, match="tau must be >= 0"):
        adaptation_weights(T, -0.1)
    with pytest.raises(ValueError, match="not all zero"):
        CategoricalTimestepSampler(retention_weights(T, 0.0, "paper"))


def test_timestep_ranges_cover_without_overlap():
    assert timestep_ranges(1000, 4) == [(0, 250), (250, 500), (500, 750), (750, 1000)]
    ranges = timestep_ranges(1000, 3)
    assert ranges[0][0] == 0 and ranges[-1][1] == 1000 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    with pytest.raises(ValueError):
        timestep_ranges(1000, 0)


@pytest.mark.parametrize("mode", GLOBAL_SAMPLE_MODES)
@pytest.mark.parametrize("p,index", [(0.3, 2), (0.0, 0), (1.0, 3)])
def test_range_sampler_matches_its_distribution(mode, p, index):
    """200k draws (batches of 64 in batch mode) follow p/T + (1-p)/|range| on the range."""
    lo, hi = timestep_ranges(T, 4)[index]
    sampler = RangeTimestepSampler(T, lo, hi, p, mode)
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sampler.sample(64, g) for _ in range(200_000 // 64)]).numpy()
    assert draws.min() >= 0 and draws.max() < T
    # 40 bins of 25 steps: equal mass inside a bin, so the chi-square has enough counts per cell.
    expected = sampler.probs().numpy().reshape(40, 25).sum(1) * len(draws)
    observed = np.bincount(draws // 25, minlength=40)
    assert observed[expected == 0].sum() == 0
    keep = expected > 0
    if mode == "sample":
        assert stats.chisquare(observed[keep], expected[keep]).pvalue > 1e-3
    else:  # whole batches move together, so check the mass inside the range rather than per-bin independence
        inside = ((draws >= lo) & (draws < hi)).mean()
        assert abs(inside - (1 - p + p * (hi - lo) / T)) < 0.02


def test_batch_mode_decides_once_and_mirrors():
    sampler = RangeTimestepSampler(T, 250, 500, 0.5, "batch")
    g = torch.Generator().manual_seed(3)
    kinds = set()
    for _ in range(200):
        t = sampler.sample(8, g)
        inside = bool(((t >= 250) & (t < 500)).all())
        lo, hi = (250, 500) if inside else (0, T)
        # the official code: 8 // 2 + 1 = 5 draws, then the mirrors of the first 3
        assert torch.equal(t[5:], lo + hi - 1 - t[:3])
        kinds.add(inside)
    assert kinds == {True, False}  # both the range and [0, T) occur, each for a whole batch
    for n in (1, 2, 7):  # odd and small batches as the official code's torch.cat(...)[:bsz]
        t = sampler.sample(n, g)
        drawn = n // 2 + 1
        assert len(t) == n and torch.equal(t[drawn:], 250 + 500 - 1 - t[: n - drawn])


# ---- Flow matching (SD3): the base density of diffusers' draw, and Diff-Tuning's reweighting of it.

def flow_sigmas(n=1000, shift=3.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=n, shift=shift).sigmas[:n].double()


def binned(indices, probs, bins=20):
    """Observed and expected counts of `indices` (0..N-1) in `bins` equal groups, for a chi-square test."""
    n = len(probs)
    observed = np.bincount(np.asarray(indices) * bins // n, minlength=bins)
    expected = np.bincount(np.arange(n) * bins // n, weights=np.asarray(probs), minlength=bins) * len(indices)
    keep = expected > 5
    return observed[keep], expected[keep] / expected[keep].sum() * observed[keep].sum()


@pytest.mark.parametrize("scheme,kw", [("logit_normal", {"logit_mean": 0.0, "logit_std": 1.0}),
                                       ("logit_normal", {"logit_mean": 0.5, "logit_std": 0.8}),
                                       ("mode", {"mode_scale": 1.29}), ("none", {}), ("cosmap", {})])
def test_flow_base_density_is_diffusers_draw(scheme, kw):
    """diffusers' own compute_density_for_timestep_sampling, binned as its scripts index (int(u N)), follows
    flow_base_probabilities (chi-square at a fixed seed); a shifted density is rejected by the same test."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from utils.diffusion.timesteps import flow_base_probabilities

    base = flow_base_probabilities(1000, scheme, **kw)
    assert abs(float(base.sum()) - 1) < 1e-9 and (base >= 0).all()
    args = {"logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29, **kw}
    u = compute_density_for_timestep_sampling(scheme, 200_000, generator=torch.Generator().manual_seed(0), **args)
    indices = (u * 1000).long().numpy()
    assert stats.chisquare(*binned(indices, base.numpy())).pvalue > 1e-3
    uniform = np.allclose(base.numpy(), 1e-3)
    wrong = flow_base_probabilities(1000, "logit_normal").numpy() if uniform else np.roll(base.numpy(), 60)
    assert stats.chisquare(*binned(indices, wrong / wrong.sum())).pvalue < 1e-6


@pytest.mark.parametrize("role,tau,form", [("adaptation", 1.0, "paper"), ("adaptation", 0.5, "paper"),
                                           ("retention", 1.0, "paper"), ("retention", 2.0, "official")])
def test_diff_tuning_flow_timesteps_follow_base_times_psi_or_xi(role, tau, form):
    """Sampled indices follow base(i) psi(sigma_i) or base(i) xi(sigma_i) (chi-square; KS on the sigmas drawn), and
    the base density alone is rejected: the reweighting is real."""
    from utils.diffusion.timesteps import flow_base_probabilities, flow_matching_weights

    sigmas, base = flow_sigmas(), flow_base_probabilities(1000, "logit_normal")
    weights = flow_matching_weights(sigmas, base, tau, role, form)
    psi = sigmas ** tau
    expected = base * (psi if role == "adaptation" else (1 - sigmas) ** tau if form == "official" else 1 - psi)
    torch.testing.assert_close(weights, expected)
    probs = (weights / weights.sum()).numpy()
    draws = CategoricalTimestepSampler(weights).sample(200_000, torch.Generator().manual_seed(1)).numpy()
    assert stats.chisquare(*binned(draws, probs)).pvalue > 1e-3
    assert stats.chisquare(*binned(draws, base.numpy())).pvalue < 1e-6
    # KS on the noise levels drawn against the exact discrete CDF of sigma under `probs`
    order = np.argsort(sigmas.numpy())
    cdf_x, cdf_p = sigmas.numpy()[order], np.cumsum(probs[order])
    ks = stats.kstest(sigmas.numpy()[draws], lambda x: np.interp(x, cdf_x, cdf_p, left=0.0, right=1.0))
    assert ks.statistic < 0.01
    mean_sigma = float((sigmas.numpy() * probs).sum())
    base_mean = float((sigmas.numpy() * base.numpy()).sum())
    assert (mean_sigma > base_mean) == (role == "adaptation")  # adaptation towards noise, retention towards data
