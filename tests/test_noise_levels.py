"""`toolkit.NoiseLevels` against diffusers' own noise schedules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler

import toolkit
from toolkit import DtkError, NoiseLevels

CONFIGS = {
    "linear": {"beta_schedule": "linear"},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
    "short": {"beta_schedule": "linear", "num_train_timesteps": 100, "beta_end": 0.05},
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_from_scheduler_config_matches_diffusers(config):
    scheduler = DDPMScheduler(**config)
    levels = NoiseLevels.from_scheduler_config(scheduler.config)
    expected = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod) ** 0.5
    torch.testing.assert_close(levels.sigmas, expected.double(), rtol=1e-6, atol=0)
    assert levels.sigma_min == pytest.approx(float(expected.min()))
    assert levels.sigma_max == pytest.approx(float(expected.max()))
    torch.testing.assert_close(
        levels.alphas_cumprod, scheduler.alphas_cumprod.double(), rtol=1e-6, atol=1e-9
    )


def test_from_alphas_cumprod_and_from_config_file_agree(tmp_path):
    scheduler = DDPMScheduler(beta_schedule="scaled_linear")
    scheduler.save_config(tmp_path)
    from_file = NoiseLevels.from_scheduler_config(tmp_path / "scheduler_config.json")
    from_alphas = NoiseLevels.from_alphas_cumprod(scheduler.alphas_cumprod)
    assert torch.equal(from_file.sigmas, from_alphas.sigmas)
    assert toolkit.NoiseLevels is NoiseLevels


def test_trained_betas_are_used():
    betas = np.linspace(1e-4, 0.03, 50)
    levels = NoiseLevels.from_scheduler_config({"trained_betas": betas.tolist()})
    alphas_cumprod = np.cumprod(1 - betas.astype(np.float32))
    assert levels.num_timesteps == 50
    np.testing.assert_allclose(levels.alphas_cumprod.numpy(), alphas_cumprod, rtol=1e-5)


def test_sigma_to_t_matches_diffusers_interpolation():
    scheduler = EulerDiscreteScheduler()
    levels = NoiseLevels.from_scheduler_config(scheduler.config)
    log_sigmas = np.log(levels.sigmas.numpy())
    rng = np.random.default_rng(0)
    sigmas = np.exp(rng.uniform(np.log(levels.sigma_min), np.log(levels.sigma_max), 64))
    ours = levels.sigma_to_t(torch.from_numpy(sigmas)).numpy()
    theirs = np.array([scheduler._sigma_to_t(s, log_sigmas) for s in sigmas])
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-7)


def test_integer_timesteps_round_trip_exactly():
    levels = NoiseLevels.from_scheduler_config({})
    t = torch.arange(0, 1000, 37, dtype=torch.float64)
    sigma = levels.t_to_sigma(t)
    torch.testing.assert_close(sigma, levels.sigmas[t.long()], rtol=1e-12, atol=0)
    torch.testing.assert_close(levels.sigma_to_t(sigma), t, rtol=0, atol=1e-9)


def test_fractional_round_trip_and_shape():
    levels = NoiseLevels.from_scheduler_config({})
    t = torch.tensor([[0.0, 12.25], [500.5, 998.9]], dtype=torch.float64)
    back = levels.sigma_to_t(levels.t_to_sigma(t))
    assert back.shape == t.shape
    torch.testing.assert_close(back, t, rtol=0, atol=1e-9)
    # float32 input keeps its dtype
    assert levels.sigma_to_t(torch.tensor([1.0])).dtype == torch.float32


def test_sigma_outside_training_range_clamps_to_the_ends():
    levels = NoiseLevels.from_scheduler_config({})
    t = levels.sigma_to_t(torch.tensor([1e-6, 1e6], dtype=torch.float64))
    assert t.tolist() == [0.0, 999.0]


def test_continuous_levels():
    levels = NoiseLevels.continuous(0.002, 80.0)
    assert not levels.is_discrete
    sigma = torch.tensor([0.5, 3.0], dtype=torch.float64)
    torch.testing.assert_close(levels.t_to_sigma(levels.sigma_to_t(sigma)), sigma)
    with pytest.raises(DtkError):
        levels.num_timesteps  # noqa: B018


@pytest.mark.parametrize(
    "config, message",
    [
        ({"beta_schedule": "sigmoid"}, "unsupported beta_schedule"),
        ({"rescale_betas_zero_snr": True}, "zero_snr"),
    ],
)
def test_unsupported_configs_are_clear_errors(config, message):
    with pytest.raises(DtkError, match=message):
        NoiseLevels.from_scheduler_config(config)


def test_bad_alphas_are_rejected(tmp_path):
    with pytest.raises(DtkError, match="strictly between 0 and 1"):
        NoiseLevels.from_alphas_cumprod([0.9, 0.0])
    with pytest.raises(DtkError, match="cannot read scheduler config"):
        NoiseLevels.from_scheduler_config(tmp_path / "missing.json")
