"""The guidance's noise level on every supported scheduler, checked against the scheduler's own numbers in float64."""

from __future__ import annotations

import inspect

import diffusers
import pytest
import torch
from conftest import levels_used

from rcgdm.cli import UserError
from rcgdm.models import load_pipeline
from rcgdm.predictor import ThreeLayerConvNet
from rcgdm.sampling.guidance import RewardGuidance
from rcgdm.sampling.sampler import sample_latents
from rcgdm.sampling.schedulers import SCHEDULERS, make_scheduler, step_position
from rcgdm.seeds import image_generators

STEPS = 6
KARRAS = {"use_karras_sigmas": True}
# (short name, config changes): every supported class, and the sigma placements that leave the training timesteps
CASES = [
    ("pndm", {}), ("ddim", {}), ("ddpm", {}), ("euler", {}), ("euler", KARRAS),
    ("euler", {"timestep_type": "continuous", "prediction_type": "v_prediction"}), ("euler_a", {}), ("heun", {}),
    ("heun", KARRAS), ("lms", {}), ("lms", KARRAS), ("dpm++", {}), ("dpm++", KARRAS), ("unipc", {}), ("unipc", KARRAS),
    ("ddim", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
]


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    pipe = load_pipeline("tiny-random", torch.float64)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return ThreeLayerConvNet().double().eval()


SCHEDULERS_NOISE = {  # written out here, apart from rcgdm.sampling.schedulers: which classes step on sigmas
    diffusers.PNDMScheduler: "alphas", diffusers.DDIMScheduler: "alphas", diffusers.DDPMScheduler: "alphas",
    diffusers.EulerDiscreteScheduler: "sigmas", diffusers.EulerAncestralDiscreteScheduler: "sigmas",
    diffusers.HeunDiscreteScheduler: "sigmas", diffusers.LMSDiscreteScheduler: "sigmas",
    diffusers.DPMSolverMultistepScheduler: "sigmas", diffusers.UniPCMultistepScheduler: "sigmas",
}


def expected_alpha_bars(scheduler) -> list[float]:
    """alpha_bar per model call, in float64, from the scheduler's own arrays: alphas_cumprod at the timestep for
    schedulers that step on training timesteps, else the variance-preserving level of the i-th sigma."""
    timesteps = scheduler.timesteps.tolist()
    if SCHEDULERS_NOISE[type(scheduler)] == "sigmas":
        return [1.0 / (1.0 + float(scheduler.sigmas[i]) ** 2) for i in range(len(timesteps))]
    cumprod = scheduler.alphas_cumprod.double()
    return [float(cumprod[int(t)]) for t in timesteps]




@pytest.mark.parametrize(("name", "changes"), CASES, ids=[f"{n}{'-' + '-'.join(c) if c else ''}" for n, c in CASES])
def test_the_term_uses_the_schedulers_own_noise_level_at_every_step(pipe, predictor, monkeypatch, name, changes):
    monkeypatch.setattr(pipe, "scheduler", make_scheduler(name, {**pipe.scheduler.config, **changes}))  # put back after
    used, latents = levels_used(pipe, RewardGuidance(predictor, target=3.0, guidance=2.0), monkeypatch, 2, STEPS, "a nice photo")
    expected = expected_alpha_bars(pipe.scheduler)
    assert len(used) == len(expected) == len(pipe.scheduler.timesteps)
    assert used == pytest.approx(expected, rel=1e-12, abs=0)
    assert torch.isfinite(latents).all()
    unguided = sample_latents(pipe, "a nice photo", image_generators(0, range(2)), None, STEPS, progress_bar=False)
    assert (latents - unguided).abs().max() > 1e-4  # the term did act


@pytest.mark.parametrize(("name", "changes"), [c for c in CASES if c[0] in ("ddim", "ddpm", "euler", "euler_a", "lms")])
def test_at_that_noise_level_the_scheduler_denoises_back_to_x0(pipe, name, changes):
    """Independent of any formula: build the model input x_t = sqrt(a) x0 + sqrt(1 - a) eps at the level used, and
    the scheduler's own step, given eps, recovers x0 (the steps below return their x0 estimate)."""
    from rcgdm.sampling.schedulers import noise_levels

    config = {**pipe.scheduler.config, **changes, "prediction_type": "epsilon", "clip_sample": False}
    scheduler = make_scheduler(name, config)
    scheduler.set_timesteps(STEPS)
    generator = torch.Generator().manual_seed(0)
    x0, eps = (torch.randn(1, 4, 8, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    for i, (t, a) in enumerate(zip(scheduler.timesteps, noise_levels(scheduler), strict=True)):
        if a == 0:
            continue
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        latents = x_t / scheduler.scale_model_input(torch.ones_like(x_t), t)  # the latent whose model input is x_t
        noisy = "generator" in inspect.signature(scheduler.step).parameters  # ancestral and DDPM steps draw noise
        out = scheduler.step(eps, t, latents, **({"generator": torch.Generator().manual_seed(i)} if noisy else {}))
        torch.testing.assert_close(out.pred_original_sample, x0, rtol=1e-6, atol=1e-6)


def test_zero_terminal_snr_leaves_that_step_alone(predictor):
    """alpha_bar = 0: x_t is pure noise and the term is zero (rcgdm/sampling/guidance.py), never inf or NaN."""
    x_t, output = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    for kind in ("epsilon", "v_prediction", "sample"):
        for path in ("xt", "x0"):
            steer = RewardGuidance(predictor, 3.0, 9.0, grad_path=path)
            assert torch.equal(steer.apply(output, x_t, torch.tensor(0.0, dtype=torch.float64), kind), output)
            near = steer.apply(output, x_t, 1e-12, kind)
            assert torch.isfinite(near).all()


@pytest.mark.parametrize("name", ["DDIMInverseScheduler", "RePaintScheduler", "SchedulerMixin", "FlowMatchLCMScheduler",
                                  "LCMScheduler", "CMStochasticIterativeScheduler"])
def test_other_schedulers_are_refused_by_class(pipe, name):
    with pytest.raises(UserError, match=f"scheduler '{name}' is not a text-to-image sampler the guidance is exact for"):
        make_scheduler(name, pipe.scheduler.config)


@pytest.mark.parametrize("name", ["pndm", "PNDMScheduler", "euler_a", "EulerAncestralDiscreteScheduler"])
def test_a_scheduler_that_cannot_step_sample_models_is_refused_by_class(pipe, name):
    with pytest.raises(UserError, match="cannot step a model that predicts 'sample'; expected one of ddim, ddpm, euler,"):
        make_scheduler(name, {**pipe.scheduler.config, "prediction_type": "sample"})


def test_flow_matching_sigmas_are_refused(pipe):
    with pytest.raises(UserError, match="flow-matching sigmas"):
        make_scheduler("dpm++", {**pipe.scheduler.config, "use_flow_sigmas": True})


def test_every_listed_scheduler_builds_on_this_install(pipe):
    for name, support in SCHEDULERS.items():
        kind = "flow_prediction" if support.noise == "flow" else None  # flow samplers step only velocity models
        assert type(make_scheduler(name, pipe.scheduler.config, kind)).__name__ == support.class_name


@pytest.mark.parametrize(("name", "kind"), [("flow_euler", "epsilon"), ("flow_heun", "v_prediction"),
                                            ("euler", "flow_prediction"), ("dpm++", "flow_prediction")])
def test_flow_and_diffusion_samplers_do_not_cross(pipe, name, kind):
    with pytest.raises(UserError, match=f"cannot step a model that predicts '{kind}'"):
        make_scheduler(name, pipe.scheduler.config, kind)


@pytest.mark.parametrize("grad_path", ["xt", "x0"])
def test_guided_euler_sampling_equals_the_steps_computed_by_hand(pipe, predictor, monkeypatch, grad_path):
    """Karras sigmas, 4 steps, no CFG, float64 (rounded where diffusers' Euler rounds to float32). By hand:
    x_in = latents / sqrt(1 + s_i^2), a = 1 / (1 + s_i^2), eps' = eps + sqrt(1 - a) g grad 1/2 (target - mu(.))^2
    (mu on x_in, or on x0_hat with eps fixed), and Euler's step latents += (s_{i+1} - s_i) eps'."""
    monkeypatch.setattr(pipe, "scheduler", make_scheduler("euler", {**pipe.scheduler.config, **KARRAS}))
    target, g, steps = 3.0, 4.0, 4
    guidance = RewardGuidance(predictor, target, g, grad_path=grad_path)
    ours = sample_latents(pipe, "a nice photo", image_generators(0, range(2)), guidance, steps, cfg=1.0, progress_bar=False)
    sigmas, timesteps = pipe.scheduler.sigmas, pipe.scheduler.timesteps  # as set for the run above (float32, as diffusers)
    text, _ = pipe.encode_prompt("a nice photo", pipe.device, 2, False)
    latents = pipe.prepare_latents(2, 4, 64, 64, torch.float64, pipe.device, image_generators(0, range(2)))
    for i, t in enumerate(timesteps):
        s, a = sigmas[i], 1 / (1 + float(sigmas[i]) ** 2)
        x_in = latents / (s**2 + 1) ** 0.5
        with torch.no_grad():
            eps = pipe.unet(x_in, t, encoder_hidden_states=text).sample
        z = x_in.clone().requires_grad_(True)
        seen = (z - (1 - a) ** 0.5 * eps) / a**0.5 if grad_path == "x0" else z
        (grad,) = torch.autograd.grad(0.5 * (target - predictor(seen)).pow(2).sum(), z)
        guided = eps + (1 - a) ** 0.5 * g * grad
        latents = latents.float() + (sigmas[i + 1] - s) * guided  # diffusers' Euler step rounds the latents to float32
    torch.testing.assert_close(ours, latents, rtol=1e-10, atol=1e-10)
    unguided = sample_latents(pipe, "a nice photo", image_generators(0, range(2)), None, steps, cfg=1.0, progress_bar=False)
    with torch.no_grad():  # and the term pulls the predicted reward toward the target (above it here)
        assert predictor(unguided).mean() < predictor(ours).mean() < target


def test_pndm_from_another_schedulers_config_skips_the_runge_kutta_warm_up():
    """Built from a config made for Euler (as SDXL's), PNDM steps as the stock SD configs set it: 5 UNet calls for 4 steps
    (PLMS's first step takes two), not 13 (its Runge-Kutta warm-up); a PNDM config that keeps the warm-up keeps it."""
    euler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear").config
    pndm = make_scheduler("pndm", euler)
    pndm.set_timesteps(4)
    assert pndm.config.skip_prk_steps and len(pndm.timesteps) == 5
    kept = make_scheduler("pndm", diffusers.PNDMScheduler(skip_prk_steps=False).config)
    kept.set_timesteps(4)
    assert len(kept.timesteps) == 13


def test_step_position_is_the_schedulers_own_lookup_and_none_where_it_holds_no_such_step():
    euler, flow, ddim = (getattr(diffusers, name)() for name in ("EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler",
                                                                 "DDIMScheduler"))
    for scheduler in (euler, flow, ddim):
        scheduler.set_timesteps(4)
        assert step_position(scheduler, scheduler.timesteps[2]) == 2
        assert step_position(scheduler, scheduler.timesteps[0] + 0.5) is None
    flow.set_begin_index(1)  # an image-to-image pipeline's start
    assert step_position(flow, flow.timesteps[3]) == 1
