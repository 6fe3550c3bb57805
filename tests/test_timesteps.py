import numpy as np
import pytest
import torch
from scipy import stats

from utils.timesteps import CategoricalTimestepSampler, adaptation_weights, retention_weights

T = 1000
u = np.arange(1, T + 1) / T


@pytest.mark.parametrize("tau", [0.3, 0.5, 1.0, 1.5, 2.0])
def test_weights_equal_formulas(tau):
    np.testing.assert_allclose(adaptation_weights(T, tau).numpy(), u**tau, rtol=1e-12)
    np.testing.assert_allclose(retention_weights(T, tau, "paper").numpy(), 1 - u**tau, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(retention_weights(T, tau, "official").numpy(), (1 - u) ** tau, rtol=1e-12)


def test_forms_agree_only_at_tau_1():
    assert torch.allclose(retention_weights(T, 1.0, "paper"), retention_weights(T, 1.0, "official"))
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
