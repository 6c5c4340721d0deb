"""The guided sampler: stock-pipeline equality at guidance 0, the equation, batching, and the effect."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from conftest import mean_prediction

from rcgdm.models import load_pipeline
from rcgdm.predictor import ThreeLayerConvNet, load_predictor
from rcgdm.sampling.guidance import RewardGuidance, reward_gradient
from rcgdm.sampling.sampler import decode, sample_latents
from rcgdm.sampling.schedulers import make_scheduler
from rcgdm.seeds import image_generators

PROMPT = "a nice photo"


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    pipe = load_pipeline("tiny-random")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def predictor(predictor_path):
    return load_predictor(predictor_path, latent_channels=4).net


@pytest.mark.parametrize("scheduler", ["pndm", "ddim", "euler_a"])
def test_guidance_zero_is_the_stock_pipeline_bit_for_bit(pipe, predictor, scheduler, monkeypatch):
    monkeypatch.setattr(pipe, "scheduler", make_scheduler(scheduler, pipe.scheduler.config))  # put back, pass or fail
    gens = image_generators(0, range(3))
    stock = pipe(PROMPT, num_images_per_prompt=3, generator=gens, num_inference_steps=6, output_type="pt").images
    for guidance in (None, RewardGuidance(predictor, target=5.0, guidance=0.0)):
        gens = image_generators(0, range(3))
        ours = decode(pipe, sample_latents(pipe, PROMPT, gens, guidance, num_inference_steps=6, progress_bar=False), gens)
        assert ours.shape == stock.shape == (3, 3, 64, 64) and ours.dtype == torch.float32
        assert torch.equal(ours, stock.float().cpu())


def test_the_term_equals_finite_differences_float64():
    torch.manual_seed(0)
    net = ThreeLayerConvNet().double().eval()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    target, guidance, alpha_bar = 0.7, 5.0, 0.3
    eps = torch.randn_like(x)
    term = RewardGuidance(net, target, guidance).apply(eps, x, alpha_bar, "epsilon") - eps

    def objective(z):  # 1/2 ||target - mu(z)||^2, summed over images
        with torch.no_grad():
            return 0.5 * (target - net(z)).pow(2).sum().item()

    h = 1e-6
    scale = (1 - alpha_bar) ** 0.5 * guidance
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):  # directional derivatives along random directions
        direction = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        numeric = (objective(x + h * direction) - objective(x - h * direction)) / (2 * h)
        assert (term * direction).sum().item() == pytest.approx(scale * numeric, rel=1e-5)
    for index in [(0, 0, 0, 0), (1, 3, 7, 2), (0, 2, 4, 5)]:  # and single coordinates
        bump = torch.zeros_like(x)
        bump[index] = h
        numeric = (objective(x + bump) - objective(x - bump)) / (2 * h)
        assert term[index].item() == pytest.approx(scale * numeric, rel=1e-4, abs=1e-9)


def test_the_term_points_toward_the_target():
    torch.manual_seed(0)
    net = ThreeLayerConvNet().double().eval()
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        mu = net(x).item()
    for target in (mu - 1, mu + 1):
        step = -1e-3 * RewardGuidance(net, target, 1.0).apply(torch.zeros_like(x), x, 0.5, "epsilon")  # the sampler subtracts eps
        with torch.no_grad():
            assert abs(net(x + step).item() - target) < abs(mu - target)


def test_batch_mean_divides_by_the_batch_size():
    torch.manual_seed(0)
    net = ThreeLayerConvNet().eval()
    x = torch.randn(3, 4, 8, 8)
    torch.testing.assert_close(reward_gradient(net, x, 1.0, batch_mean=True) * 3, reward_gradient(net, x, 1.0))
    one = reward_gradient(net, x[1:2], 1.0)
    torch.testing.assert_close(reward_gradient(net, x, 1.0)[1:2], one)  # each image's term is its own


def test_images_do_not_depend_on_the_batch_size(predictor):
    import copy

    # float64: in float32, convolutions round differently by batch size and guided sampling amplifies that (~1e-2 here)
    pipe64 = load_pipeline("tiny-random", torch.float64)
    guidance = RewardGuidance(copy.deepcopy(predictor).double(), target=-3.0, guidance=10.0)
    together = sample_latents(pipe64, PROMPT, image_generators(0, range(3)), guidance, num_inference_steps=6, progress_bar=False)
    apart = torch.cat(
        [sample_latents(pipe64, PROMPT, image_generators(0, [i]), guidance, 6, progress_bar=False) for i in range(3)]
    )
    torch.testing.assert_close(together, apart, rtol=1e-10, atol=1e-10)


def test_batch_mean_guidance_g_at_batch_b_equals_g_over_b(predictor):
    import copy

    pipe64 = load_pipeline("tiny-random", torch.float64)  # float64: sampling amplifies float32 rounding of 30/3 vs 10
    predictor64 = copy.deepcopy(predictor).double()
    original = RewardGuidance(predictor64, target=-3.0, guidance=30.0, batch_mean=True)
    ours = RewardGuidance(predictor64, target=-3.0, guidance=10.0)
    a = sample_latents(pipe64, PROMPT, image_generators(0, range(3)), original, num_inference_steps=6, progress_bar=False)
    b = sample_latents(pipe64, PROMPT, image_generators(0, range(3)), ours, num_inference_steps=6, progress_bar=False)
    assert a.dtype == torch.float64
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    c = sample_latents(pipe64, PROMPT, image_generators(0, range(3)), RewardGuidance(predictor64, -3.0, 30.0), 6,
        progress_bar=False)
    assert (c - b).abs().max() > 1e-3  # without batch_mean, 30 is not 10


def test_guidance_moves_the_predicted_reward_toward_the_target(pipe, predictor):
    def mean_reward(guidance):
        return mean_prediction(pipe, predictor, guidance, 8, 10, PROMPT)

    unguided = mean_reward(None)
    for target in (unguided - 1.0, unguided + 1.0):
        weak, strong = (mean_reward(RewardGuidance(predictor, target, g)) for g in (3.0, 30.0))
        assert abs(strong - target) < abs(weak - target) < abs(unguided - target), (target, unguided, weak, strong)
        assert abs(strong - target) < 0.5 * abs(unguided - target)


# --- other parametrizations: v_prediction and sample ---------------------------------------------------------------------------


def with_prediction_type(tmp_path_factory, tiny_model_dir, kind):
    """The tiny-random model, its scheduler set to predict `kind` (its UNet is what it is: the plumbing is tested)."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp(kind) / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": kind}))
    pipe = load_pipeline(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def other_pipes(tmp_path_factory, tiny_model_dir):
    return {kind: with_prediction_type(tmp_path_factory, tiny_model_dir, kind) for kind in ("v_prediction", "sample")}


# diffusers' PNDM cannot step a sample-predicting model: inference.py refuses that pair (test_inference.py)
@pytest.mark.parametrize(("kind", "scheduler"), [("v_prediction", "pndm"), ("v_prediction", "ddim"), ("v_prediction", "euler"),
                                                 ("sample", "ddim"), ("sample", "euler")])
def test_other_prediction_types_at_guidance_zero_are_the_stock_pipeline(other_pipes, predictor, kind, scheduler, monkeypatch):
    pipe = other_pipes[kind]
    monkeypatch.setattr(pipe, "scheduler", make_scheduler(scheduler, pipe.scheduler.config))  # put back, pass or fail
    assert pipe.scheduler.config.prediction_type == kind
    gens = image_generators(0, range(2))
    stock = pipe(PROMPT, num_images_per_prompt=2, generator=gens, num_inference_steps=5, output_type="pt").images
    gens = image_generators(0, range(2))
    ours = decode(pipe, sample_latents(pipe, PROMPT, gens, RewardGuidance(predictor, 5.0, 0.0), 5, progress_bar=False), gens)
    assert torch.equal(ours, stock.float().cpu())


def output_of(kind: str, x0: torch.Tensor, eps: torch.Tensor, a: float) -> torch.Tensor:
    """What a model of `kind` outputs for x_t = sqrt(a) x0 + sqrt(1 - a) eps, by definition."""
    return {"epsilon": eps, "v_prediction": a**0.5 * eps - (1 - a) ** 0.5 * x0, "sample": x0}[kind]


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("grad_path", ["xt", "x0"])
def test_the_shift_in_any_parametrization_is_the_papers_eps_shift(kind, grad_path):
    """Built from definitions alone: x_t from a known x0 and eps; the expected eps shift by autograd through mu
    (through x0_hat(x_t) = (x_t - sqrt(1 - a) eps) / sqrt(a), eps fixed, on the x0 path); the expected output is
    the one a model that predicted the shifted eps at the same x_t would give."""
    torch.manual_seed(0)
    net = ThreeLayerConvNet().double().eval()
    x0, eps = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    a, target, guidance = 0.3, 0.7, 5.0
    x_t = a**0.5 * x0 + (1 - a) ** 0.5 * eps
    z = x_t.clone().requires_grad_(True)
    seen = (z - (1 - a) ** 0.5 * eps) / a**0.5 if grad_path == "x0" else z
    (grad,) = torch.autograd.grad(0.5 * (target - net(seen)).pow(2).sum(), z)
    shifted_eps = eps + (1 - a) ** 0.5 * guidance * grad
    shifted_x0 = (x_t - (1 - a) ** 0.5 * shifted_eps) / a**0.5  # the same x_t, explained by the shifted eps
    expected = output_of(kind, shifted_x0, shifted_eps, a)
    steer = RewardGuidance(net, target, guidance, grad_path=grad_path)
    got = steer.apply(output_of(kind, x0, eps, a), x_t, torch.tensor(a, dtype=torch.float64), kind)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert (shifted_eps - eps).abs().max() > 1e-3  # there is a shift


@pytest.mark.parametrize("kind", ["v_prediction", "sample"])
def test_guidance_moves_the_reward_toward_the_target_for_other_prediction_types(other_pipes, predictor, kind, monkeypatch):
    pipe = other_pipes[kind]
    monkeypatch.setattr(pipe, "scheduler", make_scheduler("ddim", pipe.scheduler.config))  # put back, pass or fail

    def mean_reward(guidance):
        return mean_prediction(pipe, predictor, guidance, 6, 10, PROMPT)

    unguided = mean_reward(None)
    for target in (unguided - 1.0, unguided + 1.0):
        weak, strong = (mean_reward(RewardGuidance(predictor, target, g)) for g in (2.0, 8.0))
        toward = 1 if target > unguided else -1  # the random UNet read as another type samples poorly: check the direction
        assert 0 < toward * (weak - unguided) < toward * (strong - unguided), (kind, target, unguided, weak, strong)
        assert abs(weak - target) < abs(unguided - target), (kind, target, unguided, weak)


def test_the_sampling_core_imports_nothing_of_rcgdm_but_itself_and_the_cli():
    """docs/layout.md: rcgdm/sampling/ is the bottom of the project, which its drivers use; it uses only rcgdm/cli.py."""
    core = Path(__file__).resolve().parents[1] / "rcgdm" / "sampling"
    imported = {node.module for path in core.glob("*.py") for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rcgdm")}
    assert imported and {name for name in imported if not name.startswith("rcgdm.sampling.")} == {"rcgdm.cli"}
