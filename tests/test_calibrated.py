"""The calibrated predictor (train.py predictor="calibrated"): told the noise level, predicting log Var(y | x_t) beside
the mean, trained by its Gaussian likelihood, and guiding by the gradient of that likelihood itself."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import error_line, inference_args, latent_labels, mean_prediction, read_rows, run_script

from rcgdm.models import load_pipeline
from rcgdm.predictor import CalibratedConvNet, ThreeLayerConvNet, load_predictor
from rcgdm.sampling.guidance import RewardGuidance
from rcgdm.training import predictor_loss

F64 = torch.float64


def calibrated_net(seed: int = 0, flow: bool = False) -> CalibratedConvNet:
    """A net with random weights and, as training leaves them, BatchNorm statistics and shifts away from 0 and 1 (at
    their defaults every ReLU of an all-zero input would sit on its kink)."""
    torch.manual_seed(seed)
    net = CalibratedConvNet(4, flow).double()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.5), module.running_var.uniform_(0.5, 2), module.bias.data.normal_(0, 0.5)
    return net.eval()


@pytest.mark.parametrize(("prediction_type", "level"), [("epsilon", 0.3), ("v_prediction", 0.7), ("flow_prediction", 0.4)])
def test_the_likelihood_term_is_the_gradient_of_the_gaussian_density(prediction_type, level):
    """-guidance * n * grad_x log N(target; mu(x, t), v(x, t)), with the density from torch.distributions (not the
    project's formula), by central differences; then as the model's output in its own parametrization."""
    net, target, guidance = calibrated_net(), 0.7, 3.0
    x = torch.randn(2, 4, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
    output = torch.randn_like(x)
    shift = RewardGuidance(net, target, guidance, likelihood=True).apply(output, x, level, prediction_type) - output
    s, n = (1 - level, level) if prediction_type == "flow_prediction" else (level**0.5, (1 - level) ** 0.5)
    per_eps = {"epsilon": 1.0, "v_prediction": 1 / s, "flow_prediction": 1 / s}[prediction_type]

    def log_density(z: torch.Tensor) -> float:
        with torch.no_grad():
            out = net(z, torch.tensor(level, dtype=F64))
            return torch.distributions.Normal(out[:, 0], out[:, 1].mul(0.5).exp()).log_prob(torch.tensor(target)).sum().item()

    h, generator = 1e-6, torch.Generator().manual_seed(2)
    for _ in range(4):
        direction = torch.randn(x.shape, generator=generator, dtype=F64)
        numeric = (log_density(x + h * direction) - log_density(x - h * direction)) / (2 * h)
        assert (shift * direction).sum().item() == pytest.approx(-guidance * n * per_eps * numeric, rel=1e-4)


def test_the_variance_moves_the_term_and_a_number_guides_by_the_mean_alone():
    net, x = calibrated_net(), torch.randn(2, 4, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(3))
    zero = torch.zeros_like(x)
    with torch.no_grad():
        mu = net(x, torch.tensor(0.5, dtype=F64))[:, 0]
    at_mean = RewardGuidance(net, float(mu.mean()), 1.0, likelihood=True).apply(zero, x, 0.5, "epsilon")
    assert at_mean.abs().max() > 0  # at the mean the paper's term vanishes nearly; the density's log v term does not
    z = x.clone().requires_grad_(True)  # a number: 1/2 (target - mu)^2, the paper's term on the first output
    (grad,) = torch.autograd.grad(0.5 * (2.0 - net(z, torch.tensor(0.5, dtype=F64))[:, 0]).pow(2).sum(), z)
    torch.testing.assert_close(RewardGuidance(net, 2.0, 4.0).apply(zero, x, 0.5, "epsilon"), 0.5**0.5 * 4.0 * grad)
    with pytest.raises(ValueError, match="predicts its variance"):
        RewardGuidance(ThreeLayerConvNet().double(), 1.0, 1.0, likelihood=True)


@pytest.mark.parametrize(("prediction_type", "level"), [("v_prediction", 0.0), ("flow_prediction", 1.0)])
def test_at_no_signal_the_calibrated_net_gets_the_limit_term_and_the_papers_none(prediction_type, level):
    """FLUX.1-schnell's first step (sigma = 1), zero terminal SNR's first (alpha_bar = 0)."""
    x, output = (torch.randn(2, 4, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(k)) for k in (4, 5))
    calibrated = RewardGuidance(calibrated_net(flow=prediction_type == "flow_prediction"), 3.0, 1.0,
                                likelihood=True)
    limit = calibrated.apply(output, x, level, prediction_type) - output
    assert limit.abs().max() > 1e-3
    # the net reads s x_t, so its gradient vanishes like s and the term is continuous into no signal (not divided by 0)
    near_level = 1e-8 if prediction_type == "v_prediction" else 1 - 1e-4  # s = 1e-4
    near = calibrated.apply(output, x, near_level, prediction_type) - output
    torch.testing.assert_close(limit, near, rtol=0.02, atol=1e-3 * limit.abs().max().item())
    torch.manual_seed(0)
    paper = RewardGuidance(ThreeLayerConvNet().double().eval(), 3.0, 100.0)
    assert torch.equal(paper.apply(output, x, level, prediction_type), output)


def test_the_loss_fits_the_mean_as_the_mse_does_and_its_variance_is_the_squared_error():
    labels = torch.tensor([[1.0], [2.0], [0.0]])
    mean = torch.tensor([[0.5], [2.5], [0.0]], requires_grad=True)
    log_v = torch.zeros(3, 1, requires_grad=True)
    loss, errors = predictor_loss(torch.cat([mean, log_v], 1), labels)
    assert errors.item() == pytest.approx(0.5)
    loss.backward()
    torch.testing.assert_close(mean.grad, 2 * (mean - labels).detach())  # the MSE's gradient, untouched by v
    torch.testing.assert_close(log_v.grad, 0.5 * (1 - (mean - labels).detach() ** 2))  # zero where v = (y - mu)^2


def test_the_net_sees_the_level_and_scores_clean_images_at_its_clean_level():
    net, x = calibrated_net(flow=True), torch.randn(3, 4, 8, 8, dtype=F64)
    with torch.no_grad():
        clean, noisy = net(x), net(x, torch.tensor(0.8, dtype=F64))
        torch.testing.assert_close(clean, net(x, torch.zeros(3, dtype=F64)))
    assert clean.shape == (3, 2) and (clean - noisy).abs().max() > 1e-6
    assert net.latent_channels == 4 and net.layer1.conv1.in_channels == 5


@pytest.fixture(scope="module")
def calibrated_path(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("calibrated")
    labels = latent_labels(root / "labels.npy", 512)
    args = ["--model=tiny-random", "--data=synthetic", "--num_data=512", "--image_size=64", "--num_epochs=5",
            "--batch_size=32", "--val_fraction=0.25", f"--labels_path={labels}", f"--cache_dir={root / 'cache'}",
            f"--out_path={root / 'convnet.pth'}", "--predictor=calibrated"]
    assert run_script("train.py", *args) == 0
    return root / "convnet.pth"


def test_train_py_trains_it_records_its_calibration_and_inference_guides_by_it(tmp_path, calibrated_path,
                                                                               reward_model_path):
    saved = torch.load(calibrated_path, weights_only=True)
    assert saved["arch"] == "CalibratedConvNet" and saved["posterior_levels"] is None
    summary = json.loads(calibrated_path.with_suffix(".train_summary.json").read_text())
    ratios = [r for r in summary["calibration_by_noise"].values() if r is not None]
    assert len(ratios) == 4 and all(0.2 < r < 5 for r in ratios)  # five epochs: roughly calibrated at every level
    predictor = load_predictor(calibrated_path)
    assert predictor.steer(1.0, "posterior").likelihood and not predictor.steer(1.0, 30.0).likelihood

    pipe = load_pipeline("tiny-random")
    pipe.set_progress_bar_config(disable=True)

    def mean_reward(steer: RewardGuidance | None) -> float:  # on the final latents: the random VAE's re-encoding blurs
        return mean_prediction(pipe, lambda z: predictor.net(z)[:, :1], steer, 4, 8, "")

    unguided = mean_reward(None)  # a random model trained 5 epochs: the direction, not the law (that is the simulation's)
    for target in (unguided - 1, unguided + 1):
        moved = mean_reward(predictor.steer(target, "posterior")) - unguided
        assert 0.1 < moved / (target - unguided) < 1.5, (target, unguided, moved)

    out = tmp_path / "run"
    args = inference_args(out, reward_model_path, calibrated_path, "--target", "1", "--guidance", "posterior",
                          "--num_images", "2", "--num_inference_steps", "3")
    assert run_script(*args) == 0
    rows = read_rows(out / "results.csv")
    assert len(rows) == 2 and {row["guidance"] for row in rows} == {"posterior"}


@pytest.mark.parametrize(("flag", "expected"), [
    ("--predictor=bayes", "predictor='bayes' is out of range; expected one of paper, calibrated"),
    ("--noise=False", "predictor='calibrated' with noise=False"),
])
def test_bad_settings_are_one_line(tmp_path, capsys, small_labels, flag, expected):
    args = ["train.py", "--model=tiny-random", "--data=synthetic", "--num_data=16", "--image_size=64",
            f"--labels_path={small_labels}", f"--out_path={tmp_path / 'c.pth'}", "--predictor=calibrated", flag]
    assert run_script(*args) == 2
    assert error_line(capsys.readouterr().err).startswith(f"error: {expected}")
    assert not (tmp_path / "c.pth").exists()
