"""Schedule identities: the latent VP schedules and the masking schedules."""
import pytest
import torch

from training.schedules import LatentSchedule, MaskSchedule

T_GRID = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["sqrt", "cosine"])
def test_latent_schedule_is_variance_preserving(kind):
    a, s = LatentSchedule(kind, 1e-4).alpha_sigma(T_GRID)
    assert torch.allclose(a ** 2 + s ** 2, torch.ones_like(a), atol=1e-12)


@pytest.mark.parametrize("kind", ["sqrt", "cosine"])
def test_latent_schedule_is_monotone_from_data_to_noise(kind):
    eps = 1e-4
    a, s = LatentSchedule(kind, eps).alpha_sigma(T_GRID)
    assert (a.diff() < 0).all() and (s.diff() > 0).all()
    # The eps floor keeps both ends strictly inside (0, 1): finite SNR at t = 0 and t = 1.
    assert a[0] ** 2 == pytest.approx(1 - eps) and a[-1] ** 2 == pytest.approx(eps)


@pytest.mark.parametrize("kind", ["sqrt", "cosine"])
def test_latent_elbo_weight_is_minus_half_snr_derivative(kind):
    sched = LatentSchedule(kind, 1e-4)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6

    def snr(x):
        a2 = sched.alpha_bar_sq(x)
        return a2 / (1 - a2)

    finite_diff = -(snr(t + h) - snr(t - h)) / (2 * h) / 2
    w = sched.elbo_weight(t)
    assert (w > 0).all()
    assert torch.allclose(w, finite_diff, rtol=1e-5)


@pytest.mark.parametrize("kind,eps", [("linear", 0.0), ("loglinear", 1e-3)])
def test_mask_schedule_starts_unmasked_and_decreases(kind, eps):
    sched = MaskSchedule(kind, eps)
    alpha = sched.alpha(T_GRID)
    assert alpha[0] == 1.0
    assert (alpha.diff() < 0).all()
    expected_end = 0.0 if kind == "linear" else eps
    assert float(alpha[-1]) == pytest.approx(expected_end, abs=1e-12)


@pytest.mark.parametrize("kind", ["linear", "loglinear"])
def test_mask_elbo_weight_is_minus_alpha_prime_over_one_minus_alpha(kind):
    sched = MaskSchedule(kind, 1e-3)
    t = torch.linspace(0.01, 1.0, 50, dtype=torch.float64)
    h = 1e-7
    alpha_prime = (sched.alpha(t + h) - sched.alpha(t - h)) / (2 * h)
    expected = -alpha_prime / (1 - sched.alpha(t))
    assert torch.allclose(sched.elbo_weight(t), expected, rtol=1e-6)
