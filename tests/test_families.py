"""SDXL and SD3 (rcgdm/families.py) on their tiny random builds: the stock pipelines at guidance 0, the flow-matching
derivation, the direction of guidance, the three scripts end to end, and predictors kept to their family."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import error_line, levels_used, mean_prediction, read_rows, run_script

from rcgdm.cli import UserError
from rcgdm.guidance import RewardGuidance
from rcgdm.models import load_pipeline, model_facts
from rcgdm.predictor import ThreeLayerConvNet
from rcgdm.sampler import decode, sample_latents
from rcgdm.schedulers import make_scheduler
from rcgdm.seeds import image_generators

MODELS = {"sdxl": "tiny-sdxl-random", "sd3": "tiny-sd3-random"}
CHANNELS = {"sdxl": 4, "sd3": 16}
PROMPT = "a dog"


@pytest.fixture(scope="module")
def pipes():
    pipes = {family: load_pipeline(model) for family, model in MODELS.items()}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def predictor(family: str, dtype=torch.float32) -> ThreeLayerConvNet:
    torch.manual_seed(0)
    return ThreeLayerConvNet(CHANNELS[family]).to(dtype).eval()


# (family, scheduler, scheduler config changes, cfg): each family's own scheduler and another; SDXL also as v_prediction
STOCK_CASES = [("sdxl", "euler", {}, 5.0), ("sdxl", "ddim", {}, 5.0), ("sdxl", "euler", {"prediction_type": "v_prediction"}, 5.0),
               ("sd3", "flow_euler", {}, 7.0), ("sd3", "flow_heun", {}, 7.0), ("sd3", "flow_euler", {}, 1.0)]


@pytest.mark.parametrize(("family", "scheduler", "changes", "cfg"), STOCK_CASES)
def test_guidance_zero_is_the_stock_pipeline_bit_for_bit(pipes, monkeypatch, family, scheduler, changes, cfg):
    pipe = pipes[family]
    kind = "flow_prediction" if family == "sd3" else None
    monkeypatch.setattr(pipe, "scheduler", make_scheduler(scheduler, {**pipe.scheduler.config, **changes}, kind))
    gens = image_generators(0, range(2))
    stock = pipe(PROMPT, num_images_per_prompt=2, generator=gens, num_inference_steps=4, guidance_scale=cfg,
                 output_type="pt").images
    gens = image_generators(0, range(2))
    latents = sample_latents(pipe, PROMPT, gens, RewardGuidance(predictor(family), 5.0, 0.0), 4, cfg, progress_bar=False)
    ours = decode(pipe, latents, gens)
    assert ours.shape == (2, 3, 64, 64) and latents.shape == (2, CHANNELS[family], 8, 8)
    assert torch.equal(ours, stock.float().cpu())


@pytest.mark.parametrize("grad_path", ["xt", "x0"])
def test_the_flow_matching_shift_is_the_papers_eps_shift_as_a_velocity(grad_path):
    """From definitions alone, in float64: x_t = (1 - sigma) x0 + sigma eps, velocity v = eps - x0; the expected eps shift
    sigma * g * grad 1/2 ||target - mu||^2 by autograd (through x0_hat = (x_t - sigma eps) / (1 - sigma), eps fixed, on
    the x0 path); the expected output is the velocity that explains the same x_t with the shifted eps."""
    net = predictor("sd3", torch.float64)
    x0, eps = torch.randn(2, 16, 8, 8, dtype=torch.float64), torch.randn(2, 16, 8, 8, dtype=torch.float64)
    sigma, target, guidance = 0.6, 0.7, 5.0
    x_t = (1 - sigma) * x0 + sigma * eps
    z = x_t.clone().requires_grad_(True)
    seen = (z - sigma * eps) / (1 - sigma) if grad_path == "x0" else z
    (grad,) = torch.autograd.grad(0.5 * (target - net(seen)).pow(2).sum(), z)
    shifted_eps = eps + sigma * guidance * grad
    shifted_x0 = (x_t - sigma * shifted_eps) / (1 - sigma)
    steer = RewardGuidance(net, target, guidance, grad_path=grad_path)
    got = steer.apply(eps - x0, x_t, torch.tensor(sigma, dtype=torch.float64), "flow_prediction")
    torch.testing.assert_close(got, shifted_eps - shifted_x0, rtol=1e-10, atol=1e-10)
    assert (shifted_eps - eps).abs().max() > 1e-3  # there is a shift
    assert torch.equal(steer.apply(eps - x0, x_t, 1.0, "flow_prediction"), eps - x0)  # sigma = 1: no signal, no term


@pytest.mark.parametrize("scheduler", ["flow_euler", "flow_heun"])
def test_the_flow_term_uses_the_sigma_the_transformer_is_told(pipes, monkeypatch, scheduler):
    """At every transformer call the term's level is the sigma of that call's timestep, t / num_train_timesteps (Heun
    calls twice per step, at both ends), with the model's shift; sigma = 1 at the start, where the term is zero."""
    pipe = pipes["sd3"]
    monkeypatch.setattr(pipe, "scheduler", make_scheduler(scheduler, pipe.scheduler.config, "flow_prediction"))
    used, _ = levels_used(pipe, RewardGuidance(predictor("sd3"), 1.0, 2.0), monkeypatch, 1, 5, PROMPT, cfg=1.0)
    told = [float(t) / pipe.scheduler.config.num_train_timesteps for t in pipe.scheduler.timesteps]
    assert len(used) == len(told) == (5 if scheduler == "flow_euler" else 9)
    assert used == pytest.approx(told, rel=1e-6) and used[0] == 1.0


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_guidance_moves_the_predicted_reward_toward_targets_above_and_below(family):
    pipe = load_pipeline(MODELS[family], torch.float64)
    pipe.set_progress_bar_config(disable=True)
    net = predictor(family, torch.float64)

    def mean_reward(steer: RewardGuidance | None) -> float:
        return mean_prediction(pipe, net, steer, 4, 8, PROMPT)

    unguided = mean_reward(None)
    for target in (unguided - 1.0, unguided + 1.0):
        weak, strong = (mean_reward(RewardGuidance(net, target, g)) for g in (10.0, 100.0))
        toward = 1 if target > unguided else -1
        assert 0 < toward * (weak - unguided) < toward * (strong - unguided), (family, target, unguided, weak, strong)


@pytest.fixture(scope="module")
def labels(tmp_path_factory):
    root = tmp_path_factory.mktemp("labels")
    args = ["--data", "synthetic", "--num_data", "32", "--weights", "none", "--out_dir", root]
    assert run_script("fake_dataset.py", *args) == 0
    return root


@pytest.mark.parametrize(("family", "other"), [("sdxl", "sd3"), ("sd3", "sdxl")])
def test_the_three_scripts_run_on_the_family_and_its_predictor_is_refused_by_another(tmp_path, capsys, labels, family,
                                                                                     other):
    model, predictor_path = MODELS[family], tmp_path / "convnet.pth"
    args = [f"--model={model}", "--data=synthetic", "--num_data=32", "--image_size=64", "--num_epochs=1", "--batch_size=16",
            "--val_fraction=0.25", f"--labels_path={labels / 'cifar10_outputs_with_noise.npy'}",
            f"--cache_dir={tmp_path / 'cache'}", f"--out_path={predictor_path}"]
    assert run_script("train.py", *args) == 0
    saved = torch.load(predictor_path, weights_only=True)
    assert (saved["family"], saved["latent_channels"], saved["latent_size"]) == (family, CHANNELS[family], [8, 8])
    # the error curve is in the family's noise level: error falls as alpha_bar rises (SDXL), rises with sigma (SD3)
    variances = saved["posterior_variances"]
    assert variances == (sorted(variances) if family == "sd3" else sorted(variances, reverse=True))

    common = ["--predictor", predictor_path, "--reward_model", labels / "reward_model.pth", "--seed", "0"]
    run = ["--model", model, *common, "--target", "-1", "3", "--guidance", "0", "30", "posterior", "--num_images", "2",
           "--num_inference_steps", "4", "--out_dir", tmp_path / "run"]
    assert run_script("inference.py", *run) == 0
    rows = read_rows(tmp_path / "run" / "results.csv")
    assert len(rows) == 12 and all(float(row["gt"]) == float(row["gt"]) for row in rows)  # finite: NaN is never a result
    settings = json.loads((tmp_path / "run" / "summary.json").read_text())["settings"]
    expected = {"sdxl": ("euler", 5.0), "sd3": ("flow_euler", 7.0)}[family]  # the family's own defaults
    assert (settings["scheduler"], settings["cfg"]) == expected

    capsys.readouterr()
    refused = ["--model", MODELS[other], *common, "--ignore_provenance", "--out_dir", tmp_path / "refused"]
    assert run_script("inference.py", *refused) == 2
    assert f"was trained on {family.upper()} latents; the model is {other.upper()}" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "refused").exists()


def test_flux_and_unknown_pipelines_are_refused_with_the_reason(tmp_path):
    unknown = "is a 'KandinskyPipeline'; expected a StableDiffusionPipeline"
    for name, reason in (("FluxPipeline", "FLUX is guidance-distilled"), ("KandinskyPipeline", unknown)):
        folder = tmp_path / name
        folder.mkdir()
        index = {"_class_name": name, "transformer": ["diffusers", "FluxTransformer2DModel"]}
        (folder / "model_index.json").write_text(json.dumps(index))
        with pytest.raises(UserError, match=reason):
            model_facts(str(folder))


def test_sdxl_in_float16_decodes_with_a_float32_vae_as_its_pipeline():
    """SDXL's VAE overflows in float16; its pipeline upcasts it to decode (force_upcast), and so does ours, for good."""
    from diffusers import StableDiffusionXLPipeline

    from rcgdm.models import ensure_built

    ours = load_pipeline(MODELS["sdxl"], torch.float16)
    assert (ours.unet.dtype, ours.vae.dtype) == (torch.float16, torch.float32)
    stock = StableDiffusionXLPipeline.from_pretrained(ensure_built(MODELS["sdxl"]), torch_dtype=torch.float16,
                                                      add_watermarker=False)
    for pipe in (ours, stock):
        pipe.set_progress_bar_config(disable=True)
    gens = image_generators(0, range(2))
    expected = stock(PROMPT, num_images_per_prompt=2, generator=gens, num_inference_steps=3, output_type="pt").images
    gens = image_generators(0, range(2))
    got = decode(ours, sample_latents(ours, PROMPT, gens, None, 3, 5.0, progress_bar=False), gens)
    assert torch.isfinite(got).all() and torch.equal(got, expected.float())
