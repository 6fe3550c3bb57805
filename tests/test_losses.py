import torch
from diffusers import DDPMScheduler

from fixtures.small_dit import build_pipeline
from utils.diffusion.losses import LearnedVarianceLoss, epsilon_mse, min_snr_weights

sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
vb = LearnedVarianceLoss(sched.betas)


def noisy_batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 4, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([1, 5, 50, 300, 700, 999])[:n]
    return x0, noise, sched.add_noise(x0, noise, t), t


def test_vb_is_zero_at_the_true_posterior_and_positive_elsewhere():
    x0, noise, xt, t = noisy_batch()
    # Exact eps gives the exact posterior mean; v = -1 selects the (clipped) posterior variance.
    exact = vb(noise, -torch.ones_like(x0), x0, xt, t)
    assert exact.abs().max() < 1e-5
    # beta_t instead of the posterior variance: KL > 0 where the two differ (small t; they meet at large t).
    assert (vb(noise, torch.ones_like(x0), x0, xt, t)[:3] > 1e-4).all()
    assert (vb(noise + 0.3, -torch.ones_like(x0), x0, xt, t) > exact + 1e-4).all()  # wrong mean: KL grows


def test_vb_at_t0_is_decoder_nll():
    x0, noise, xt, _ = noisy_batch()
    t = torch.zeros(len(x0), dtype=torch.long)
    nll = vb(noise, torch.zeros_like(x0), x0, sched.add_noise(x0, noise, t), t)
    assert torch.isfinite(nll).all() and (nll > 0).all()


def test_variance_channels_receive_gradient_only_through_vb():
    model = build_pipeline().transformer
    x0, noise, xt, t = noisy_batch()
    labels = torch.arange(len(x0))
    # proj_out_2 rows are laid out (p, q, c) with c the fastest axis: rows with c >= 4 are the variance channels.
    c = model.config.out_channels
    var_rows = torch.arange(model.proj_out_2.out_features) % c >= model.config.in_channels

    def grads(use_vb):
        model.zero_grad()
        eps, v = model(xt, timestep=t, class_labels=labels).sample.chunk(2, dim=1)
        loss = epsilon_mse(eps, noise) + (vb(eps, v, x0, xt, t) if use_vb else 0)
        loss.mean().backward()
        return model.proj_out_2.weight.grad.abs().sum(1)

    g = grads(use_vb=True)
    assert (g[var_rows] > 0).all() and (g[~var_rows] > 0).all()
    assert (grads(use_vb=False)[var_rows] == 0).all()  # the MSE alone never trains them


def test_min_snr_weights_follow_the_formula_for_each_target():
    t = torch.tensor([0, 10, 100, 300, 700, 999])
    abar = sched.alphas_cumprod[t].double()
    snr = abar / (1 - abar)
    clipped = snr.clamp(max=5.0)
    expected = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}
    for prediction_type, want in expected.items():
        s = DDPMScheduler.from_config(sched.config, prediction_type=prediction_type)
        got = min_snr_weights(s, t, 5.0)
        assert torch.allclose(got.double(), want, rtol=1e-4), prediction_type
    eps = min_snr_weights(sched, t, 5.0)
    # Small t (SNR above 5) is down-weighted, large t (SNR below 5) keeps weight 1.
    assert eps[0] < 0.01 and eps[1] < 0.1 and torch.equal(eps[3:], torch.ones(3))
