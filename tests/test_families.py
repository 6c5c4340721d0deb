"""SDXL, SD3, SD3.5 and FLUX (rcgdm/sampling/families.py) on their tiny random builds: the stock pipelines at guidance 0, the
flow-matching derivation (FLUX's packing and dynamic shifting included), the direction of guidance, the three scripts end
to end, and predictors kept to their family."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import error_line, levels_used, mean_prediction, quiet_pipelines, read_rows, run_script, stock_images
from diffusers import FluxPipeline

from rcgdm.cli import UserError
from rcgdm.models import load_pipeline, model_facts
from rcgdm.predictor import ThreeLayerConvNet, load_predictor
from rcgdm.sampling.families import FAMILIES
from rcgdm.sampling.guidance import RewardGuidance
from rcgdm.sampling.sampler import decode, sample_latents
from rcgdm.sampling.schedulers import make_scheduler
from rcgdm.seeds import image_generators
from rcgdm.training import noising_schedule

MODELS = {"sdxl": "tiny-sdxl-random", "sd3": "tiny-sd3-random", "sd35": "tiny-sd35-random", "flux": "tiny-flux-random",
          "flux-schnell": "tiny-flux-schnell-random"}
CHANNELS = {"sdxl": 4, "sd3": 16, "sd35": 16, "flux": 16, "flux-schnell": 16}
FAMILY = {build: "sd3" if build == "sd35" else build for build in MODELS}  # SD3.5 is an SD3 pipeline
PROMPT, SIZE = "a dog", 64  # FLUX's default size is its pipeline's 1024 px: every call here asks for 64


@pytest.fixture(scope="module")
def pipes():
    return quiet_pipelines(MODELS)


def predictor(family: str, dtype=torch.float32) -> ThreeLayerConvNet:
    torch.manual_seed(0)
    return ThreeLayerConvNet(CHANNELS[family]).to(dtype).eval()


# (family, scheduler, scheduler config changes, cfg, FLUX's distilled guidance): each family's own scheduler and another;
# SDXL also as v_prediction; SD3 also with dynamic shifting; FLUX.1-dev-shaped with and without true CFG
STOCK_CASES = [("sdxl", "euler", {}, 5.0, None), ("sdxl", "ddim", {}, 5.0, None),
               ("sdxl", "euler", {"prediction_type": "v_prediction"}, 5.0, None), ("sd3", "flow_euler", {}, 7.0, None),
               ("sd3", "flow_heun", {}, 7.0, None), ("sd3", "flow_euler", {}, 1.0, None),
               ("sd3", "flow_euler", {"use_dynamic_shifting": True}, 7.0, None), ("sd35", "flow_euler", {}, 7.0, None),
               ("flux", "flow_euler", {}, 1.0, None), ("flux", "flow_euler", {}, 3.0, 5.0),
               ("flux-schnell", "flow_euler", {}, 1.0, None)]


@pytest.mark.parametrize(("family", "scheduler", "changes", "cfg", "distilled"), STOCK_CASES)
def test_guidance_zero_is_the_stock_pipeline_bit_for_bit(pipes, monkeypatch, family, scheduler, changes, cfg, distilled):
    pipe = pipes[family]
    kind = "flow_prediction" if FAMILIES[FAMILY[family]].flow else None
    monkeypatch.setattr(pipe, "scheduler", make_scheduler(scheduler, {**pipe.scheduler.config, **changes}, kind))
    stock = stock_images(pipe, family, 4, cfg, distilled)
    gens = image_generators(0, range(2))
    latents = sample_latents(pipe, PROMPT, gens, RewardGuidance(predictor(family), 5.0, 0.0), 4, cfg, SIZE, SIZE,
                             progress_bar=False, distilled_guidance=distilled)
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


def flux_sigmas(steps: int, size: int) -> list[float]:
    """FLUX.1-dev's schedule from its definition: sigmas linspace(1, 1/steps, steps) shifted by
    e^mu / (e^mu + 1/sigma - 1), mu linear in the image's token count from 0.5 at 256 tokens to 1.15 at 4096."""
    tokens = (size // 8 // 2) ** 2  # 8x VAE, 2x2 packing
    mu = 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)
    return [math.exp(mu) / (math.exp(mu) + 1 / (1 - k / steps) - 1) for k in range(steps)]


@pytest.mark.parametrize("size", [64, 128])
def test_flux_guides_at_its_dynamically_shifted_sigmas_and_trains_at_them(pipes, monkeypatch, size):
    """The term's level at every step is the shifted sigma of the closed form, which moves with the image's size; train.py
    noises at the same sigmas for its image size."""
    pipe = pipes["flux"]
    used, _ = levels_used(pipe, RewardGuidance(predictor("flux"), 1.0, 2.0), monkeypatch, 1, 5, PROMPT, cfg=1.0, size=size)
    assert used == pytest.approx(flux_sigmas(5, size), rel=1e-6) and used[0] == 1.0
    pool = noising_schedule(MODELS["flux"], model_facts(MODELS["flux"]), 5, (size // 8, size // 8)).timesteps
    assert sorted(pool.tolist(), reverse=True) == pytest.approx([1000 * s for s in flux_sigmas(5, size)], rel=1e-6)


def test_packing_is_diffusers_own_and_unpacking_its_inverse():
    from rcgdm.sampling.sampler import pack, unpack

    latents = torch.randn(2, 16, 8, 6)
    assert torch.equal(pack(latents), FluxPipeline._pack_latents(latents, 2, 16, 8, 6))
    assert torch.equal(unpack(pack(latents), 8, 6), latents)


def test_the_flux_term_through_packing_is_the_steps_computed_by_hand():
    """float64, 3 steps, no CFG, distilled guidance 3.5. By hand: the transformer on diffusers' own packing of the
    latents; its velocity unpacked (diffusers' unpacking) and shifted as the eps shift sigma g grad 1/2 (target - mu)^2
    (autograd on the unpacked latent) requires, v' = v + sigma g grad / (1 - sigma) (none at sigma = 1); the Euler step
    x += (sigma_next - sigma) v' (rounding x to float32, as diffusers' step does)."""
    pipe = load_pipeline(MODELS["flux"], torch.float64)
    pipe.set_progress_bar_config(disable=True)
    net, target, g, steps = predictor("flux", torch.float64), 2.0, 20.0, 3
    ours = sample_latents(pipe, PROMPT, image_generators(0, range(2)), RewardGuidance(net, target, g), steps, 1.0, SIZE,
                          SIZE, progress_bar=False)
    sigmas = pipe.scheduler.sigmas  # as set for the run above (float32, as diffusers)
    assert sigmas[:steps].tolist() == pytest.approx(flux_sigmas(steps, SIZE), rel=1e-6)
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPT, None, pipe.device, 2, max_sequence_length=512)
    tokens, image_ids = pipe.prepare_latents(2, 16, SIZE, SIZE, torch.float64, pipe.device, image_generators(0, range(2)))
    for i in range(steps):
        sigma = sigmas[i]
        with torch.no_grad():
            v_tokens = pipe.transformer(hidden_states=tokens, timestep=(1000 * sigma).expand(2).double() / 1000,
                                        guidance=torch.full([2], 3.5), pooled_projections=pooled, encoder_hidden_states=embeds,
                                        txt_ids=text_ids, img_ids=image_ids).sample
        x, v = (FluxPipeline._unpack_latents(t, SIZE, SIZE, pipe.vae_scale_factor) for t in (tokens, v_tokens))
        if sigma < 1:
            z = x.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(0.5 * (target - net(z)).pow(2).sum(), z)
            v = v + float(sigma) * g * grad / (1 - float(sigma))
        tokens = FluxPipeline._pack_latents(x.float() + (sigmas[i + 1] - sigma) * v, 2, 16, 8, 8)
    torch.testing.assert_close(ours, FluxPipeline._unpack_latents(tokens, SIZE, SIZE, pipe.vae_scale_factor), rtol=1e-10,
                               atol=1e-10)
    unguided = sample_latents(pipe, PROMPT, image_generators(0, range(2)), None, steps, 1.0, SIZE, SIZE, progress_bar=False)
    assert (ours - unguided).abs().max() > 1e-3  # the term moved the latents


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_guidance_moves_the_predicted_reward_toward_targets_above_and_below(family):
    pipe = load_pipeline(MODELS[family], torch.float64)
    pipe.set_progress_bar_config(disable=True)
    net = predictor(family, torch.float64)

    def mean_reward(steer: RewardGuidance | None) -> float:
        return mean_prediction(pipe, net, steer, 4, 8, PROMPT, cfg=FAMILIES[family].cfg, size=SIZE)

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


@pytest.mark.parametrize(("family", "other"), [("sdxl", "sd3"), ("sd3", "flux"), ("flux", "sdxl")])
def test_the_three_scripts_run_on_the_family_and_its_predictor_is_refused_by_another(tmp_path, capsys, labels, family,
                                                                                     other):
    model, predictor_path = MODELS[family], tmp_path / "convnet.pth"
    args = [f"--model={model}", "--data=synthetic", "--num_data=32", "--image_size=64", "--num_epochs=1", "--batch_size=16",
            "--val_fraction=0.25", f"--labels_path={labels / 'cifar10_outputs_with_noise.npy'}",
            f"--cache_dir={tmp_path / 'cache'}", f"--out_path={predictor_path}"]
    assert run_script("train.py", *args) == 0
    saved = torch.load(predictor_path, weights_only=True)
    assert (saved["family"], saved["latent_channels"], saved["latent_size"]) == (family, CHANNELS[family], [8, 8])
    summary = json.loads(predictor_path.with_suffix(".train_summary.json").read_text())
    assert summary["config"]["num_inference_steps"] == FAMILIES[family].steps  # noised at the family's own levels
    # the error curve is in the family's noise level: error falls as alpha_bar rises (SDXL), rises with sigma (flow)
    variances = saved["posterior_variances"]
    assert variances == (sorted(variances) if FAMILIES[family].flow else sorted(variances, reverse=True))

    common = ["--predictor", predictor_path, "--reward_model", labels / "reward_model.pth", "--seed", "0"]
    run = ["--model", model, *common, "--target", "-1", "3", "--guidance", "0", "30", "posterior", "--num_images", "2",
           "--num_inference_steps", "4", "--height", "64", "--width", "64", "--out_dir", tmp_path / "run"]
    assert run_script("inference.py", *run) == 0
    rows = read_rows(tmp_path / "run" / "results.csv")
    assert len(rows) == 12 and all(float(row["gt"]) == float(row["gt"]) for row in rows)  # finite: NaN is never a result
    settings = json.loads((tmp_path / "run" / "summary.json").read_text())["settings"]
    expected = {"sdxl": ("euler", 5.0, None), "sd3": ("flow_euler", 7.0, None), "flux": ("flow_euler", 1.0, 3.5)}[family]
    assert (settings["scheduler"], settings["cfg"], settings["distilled_guidance"]) == expected  # the family's defaults

    capsys.readouterr()
    refused = ["--model", MODELS[other], *common, "--ignore_provenance", "--out_dir", tmp_path / "refused"]
    assert run_script("inference.py", *refused) == 2
    labels = {"sdxl": "SDXL", "sd3": "SD3", "flux": "FLUX.1-dev or FLUX.1-schnell"}  # FLUX's two share their latents
    refusal = f"was trained on {labels[family]} latents; the model is {FAMILIES[other].label}"
    assert refusal in error_line(capsys.readouterr().err)
    assert not (tmp_path / "refused").exists()


def test_unknown_pipelines_and_a_flux_label_on_another_transformer_are_refused_with_the_reason(tmp_path):
    unknown = "is a 'KandinskyPipeline'; expected a StableDiffusionPipeline"
    refiner = "is a 'StableDiffusionXLImg2ImgPipeline': an image-to-image pipeline"
    for name, reason in (("StableDiffusionXLImg2ImgPipeline", refiner), ("KandinskyPipeline", unknown)):
        folder = tmp_path / name
        folder.mkdir()
        index = {"_class_name": name, "transformer": ["diffusers", "FluxTransformer2DModel"]}
        (folder / "model_index.json").write_text(json.dumps(index))
        with pytest.raises(UserError, match=reason):
            model_facts(str(folder))
    from rcgdm.models import ensure_built

    folder = tmp_path / "labelled-flux"
    shutil.copytree(ensure_built(MODELS["sd3"]), folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(UserError, match=r"says FluxPipeline, but transformer/config\.json is a 'SD3Transformer2DModel'"):
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


def test_flux_in_bfloat16_is_its_stock_pipeline_bit_for_bit():
    """FLUX ships in bfloat16; on the CPU too, the sampler's images equal the stock pipeline's, true CFG included."""
    pipe = load_pipeline(MODELS["flux"], torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.dtype == torch.bfloat16
    stock = stock_images(pipe, "flux", 3, 2.0)
    gens = image_generators(0, range(2))
    latents = sample_latents(pipe, PROMPT, gens, RewardGuidance(predictor("flux"), 5.0, 0.0), 3, 2.0, SIZE, SIZE,
                             progress_bar=False)
    assert latents.dtype == torch.bfloat16
    got = decode(pipe, latents, gens)
    assert torch.isfinite(got).all() and torch.equal(got, stock.float())


def test_distilled_guidance_is_refused_where_there_is_no_guidance_embedding_or_no_number(pipes):
    from rcgdm.pipeline import RewardDirectedPipeline
    from rcgdm.predictor import TrainedPredictor

    trained = TrainedPredictor(predictor("flux"), {"family": "flux", "latent_size": [8, 8]}, None, "convnet.pth")
    schnell = RewardDirectedPipeline(pipes["flux-schnell"], trained)
    with pytest.raises(UserError, match=r"5 is given, but FLUX\.1-schnell's denoiser has no guidance embedding"):
        schnell("a dog", 1.0, 10.0, num_inference_steps=2, height=SIZE, width=SIZE, distilled_guidance=5.0)
    generators = [torch.Generator().manual_seed(0)]
    with pytest.raises(UserError, match=r"5 is given, but FLUX\.1-schnell's denoiser"):  # the sampler itself, too
        sample_latents(pipes["flux-schnell"], "a dog", generators, None, 2, 1.0, SIZE, SIZE, False, distilled_guidance=5.0)
    with pytest.raises(UserError, match=r"5 is given, but SDXL's denoiser"):
        sample_latents(pipes["sdxl"], "a dog", generators, None, 2, 1.0, SIZE, SIZE, False, distilled_guidance=5.0)
    with pytest.raises(UserError, match="distilled_guidance nan is not a finite number in float32's range; expected one"):
        RewardDirectedPipeline(pipes["flux"], trained)("a dog", distilled_guidance=float("nan"))


@pytest.mark.parametrize(("family", "multiple"), [("flux", 16), ("sdxl", 8)])
def test_an_image_size_that_makes_no_whole_latent_tokens_is_one_line(pipes, family, multiple):
    """FLUX takes multiples of 16 (the VAE's 8x times 2x2 tokens; SD3 too, with its patch size 2), SDXL of 8: a size
    between is refused by the sampler and by the API, never a reshape error midway."""
    from rcgdm.pipeline import RewardDirectedPipeline
    from rcgdm.predictor import TrainedPredictor

    height = SIZE + multiple // 2 if multiple == 16 else SIZE + 4
    generators = [torch.Generator().manual_seed(0)]
    with pytest.raises(UserError, match=f"height {height} is not a multiple of {multiple}"):
        sample_latents(pipes[family], "a dog", generators, None, 1, 1.0, height, SIZE, False)
    trained = TrainedPredictor(predictor(family), {"family": FAMILY[family], "latent_size": [8, 8]}, None, "convnet.pth")
    with pytest.raises(UserError, match=f"height {height} is not a multiple of {multiple}"):
        RewardDirectedPipeline(pipes[family], trained)("a dog", num_inference_steps=1, height=height, width=SIZE)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_a_calibrated_predictor_trains_on_the_family_and_guides_its_first_step_too(tmp_path, monkeypatch, labels, family):
    """train.py predictor="calibrated" records the family (a flow family's clean level is sigma = 0) and noises at the
    model's own default levels; --guidance posterior follows its likelihood; on FLUX.1-schnell the first step, sigma = 1,
    is guided too."""
    path, sampled = tmp_path / "calibrated.pth", "flux-schnell" if family == "flux" else family
    args = [f"--model={MODELS[sampled]}", "--data=synthetic", "--num_data=32", "--image_size=64", "--num_epochs=1",
            "--batch_size=16", "--val_fraction=0.25", f"--labels_path={labels / 'cifar10_outputs_with_noise.npy'}",
            f"--cache_dir={tmp_path / 'cache'}", f"--out_path={path}", "--predictor=calibrated"]
    assert run_script("train.py", *args) == 0
    predictor = load_predictor(path)
    assert (predictor.meta["arch"], predictor.meta["family"]) == ("CalibratedConvNet", family)
    assert predictor.net.clean_level == (0.0 if FAMILIES[family].flow else 1.0)
    summary = json.loads(path.with_suffix(".train_summary.json").read_text())
    assert summary["config"]["num_inference_steps"] == FAMILIES[sampled].steps  # schnell's 4 levels, which it samples at
    pipe = load_pipeline(MODELS[sampled])
    pipe.set_progress_bar_config(disable=True)
    steer = predictor.steer(3.0, "posterior")
    used, guided = levels_used(pipe, steer, monkeypatch, 2, 4, PROMPT, FAMILIES[sampled].cfg, SIZE)
    monkeypatch.undo()
    unguided = sample_latents(pipe, PROMPT, image_generators(0, range(2)), None, 4, FAMILIES[sampled].cfg, SIZE, SIZE,
                              progress_bar=False)
    assert torch.isfinite(guided).all() and (guided - unguided).abs().max() > 1e-4
    if family == "flux":
        assert used[0] == 1.0  # schnell starts at sigma = 1, where the paper's level-blind net gets no term
        output = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
        x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
        assert (steer.apply(output, x, 1.0, "flow_prediction") - output).abs().max() > 0
