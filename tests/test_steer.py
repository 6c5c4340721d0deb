"""rcgdm.steer: the paper's term inside stock diffusers pipelines. It gives RewardDirectedPipeline's images on the four
families, steers the pipelines that have no loop here (image-to-image, inpainting, ControlNet, SDXL's image-to-image),
refuses what it cannot guide in one line before any step, and leaves the stock pipeline behind."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import quiet_pipelines, stock_images
from diffusers import (
    ControlNetModel,
    DDPMPipeline,
    LCMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)

from rcgdm import steer
from rcgdm.cli import InputError
from rcgdm.models import load_pipeline
from rcgdm.pipeline import RewardDirectedPipeline
from rcgdm.predictor import ThreeLayerConvNet, TrainedPredictor
from rcgdm.seeds import image_generators
from rcgdm.steering import token_grid

MODELS = {"sd": "tiny-random", "sdxl": "tiny-sdxl-random", "sd3": "tiny-sd3-random", "flux": "tiny-flux-random"}
CHANNELS = {"sd": 4, "sdxl": 4, "sd3": 16, "flux": 16}
PROMPT, SIZE, STEPS = "a dog", 64, 4
CFG_ROUNDING = 1e-4  # images in [0, 1]: the most the hook's shift added to both CFG halves may differ from the shifted
# combination, after 4 steps (measured: 2.7e-5 on SD at cfg 7.5 with PNDM, 4.4e-6 at most on SDXL, SD3 and FLUX)


@pytest.fixture(scope="module")
def pipes():
    return quiet_pipelines(MODELS)


def trained(family: str, **meta) -> TrainedPredictor:
    """A random predictor, recorded as trained on `family`'s latents (with `meta`)."""
    torch.manual_seed(0)
    return TrainedPredictor(ThreeLayerConvNet(CHANNELS[family]).eval(), {"family": family, **meta}, None, "random.pth")


CURVE = {"posterior_levels": [0.0, 0.5, 1.0], "posterior_variances": [0.05, 0.02, 0.01]}
# (family, cfg, guidance, predictor meta, call settings): each family with and without classifier-free guidance (FLUX's
# true CFG), and on SD the x0 path, the posterior strength and the original code's batch mean
CASES = [("sd", 1.0, 50.0, {}, {}), ("sd", 7.5, 50.0, {}, {}), ("sd", 7.5, 50.0, {"noised": False}, {"grad_path": "x0"}),
         ("sd", 7.5, "posterior", CURVE, {}), ("sd", 1.0, 50.0, {}, {"batch_mean": True}), ("sdxl", 1.0, 50.0, {}, {}),
         ("sdxl", 5.0, 50.0, {}, {}), ("sd3", 1.0, 20.0, {}, {}), ("sd3", 7.0, 20.0, {}, {}), ("flux", 1.0, 20.0, {}, {}),
         ("flux", 3.0, 20.0, {}, {})]


@pytest.mark.parametrize(("family", "cfg", "guidance", "meta", "settings"), CASES)
def test_steer_gives_the_api_images_on_every_family(pipes, family, cfg, guidance, meta, settings):
    pipe, predictor = pipes[family], trained(family, **meta)
    api = RewardDirectedPipeline(pipe, predictor)
    unguided = stock_images(pipe, family, STEPS, cfg, prompt=PROMPT, size=SIZE)
    for target in (-1.0, 1.0):
        ours = api(PROMPT, target, guidance, num_images=2, seed=0, num_inference_steps=STEPS, cfg=cfg, height=SIZE,
                   width=SIZE, batch_size=2, **settings).images
        with steer(pipe, predictor, target, guidance, **settings):
            steered = stock_images(pipe, family, STEPS, cfg, prompt=PROMPT, size=SIZE).float()
        assert (ours - unguided).abs().max() > 0.01  # the term moved the images
        if cfg == 1.0:  # the same operations: bit for bit
            assert torch.equal(steered, ours), (target, (steered - ours).abs().max())
        else:  # the shift added to both halves, then combined: float rounding
            assert (steered - ours).abs().max() <= CFG_ROUNDING, (target, (steered - ours).abs().max())


def mean_predicted(pipe, predictor: TrainedPredictor, call: dict) -> float:
    """The predictor's mean over the final latents of a call of `pipe` (2 images of seed 0)."""
    latents = pipe(PROMPT, num_images_per_prompt=2, generator=image_generators(0, range(2)), output_type="latent",
                   **call).images
    with torch.no_grad():
        return predictor.net(latents.float()).mean().item()


def picture() -> torch.Tensor:
    """A 64 x 64 test image (1, 3, 64, 64) in [0, 1]: a bright square on a gradient."""
    image = torch.linspace(0, 1, SIZE).expand(1, 3, SIZE, SIZE).clone()
    image[:, :, 16:48, 16:48] = 0.9
    return image


@pytest.fixture(scope="module")
def other_pipelines(pipes) -> dict:
    """Pipelines with no loop of rcgdm's, built on the tiny models' components, and a call of each."""
    sd, sdxl = pipes["sd"], pipes["sdxl"]
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(sd.unet, conditioning_embedding_out_channels=(8, 8, 8, 8))
    inpainting_unet = UNet2DConditionModel.from_config({**sd.unet.config, "in_channels": 9})  # latents, mask, image
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[:, :, :, : SIZE // 2] = 1
    steps = {"num_inference_steps": 8, "height": SIZE, "width": SIZE}
    return {
        "img2img": (StableDiffusionImg2ImgPipeline(**sd.components),
                    {"image": picture(), "strength": 0.8, "num_inference_steps": 8}),
        "inpaint": (StableDiffusionInpaintPipeline(**sd.components), {"image": picture(), "mask_image": mask, **steps}),
        "inpaint-9-channels": (StableDiffusionInpaintPipeline(**{**sd.components, "unet": inpainting_unet}),
                               {"image": picture(), "mask_image": mask, **steps}),
        "controlnet": (StableDiffusionControlNetPipeline(**sd.components, controlnet=controlnet),
                       {"image": picture(), **steps}),
        "sdxl-img2img": (StableDiffusionXLImg2ImgPipeline(**sdxl.components),
                         {"image": picture(), "strength": 0.8, "num_inference_steps": 8}),
    }


@pytest.mark.parametrize("name", ["img2img", "inpaint", "inpaint-9-channels", "controlnet", "sdxl-img2img"])
def test_steer_moves_other_pipelines_toward_targets_above_and_below(other_pipelines, name):
    pipe, call = other_pipelines[name]
    pipe.set_progress_bar_config(disable=True)
    predictor = trained("sdxl" if name.startswith("sdxl") else "sd")
    unguided = mean_predicted(pipe, predictor, call)
    for target in (unguided - 1.0, unguided + 1.0):
        moved = []
        for guidance in (20.0, 100.0):
            with steer(pipe, predictor, target, guidance):
                moved.append(mean_predicted(pipe, predictor, call) - unguided)
        toward = 1 if target > unguided else -1
        assert 0 < toward * moved[0] < toward * moved[1], (name, target, unguided, moved)


def test_the_pipeline_is_the_stock_one_after_the_context_and_after_an_exception_inside_it(pipes):
    pipe, predictor = pipes["sd"], trained("sd")
    before = stock_images(pipe, "sd", STEPS, 7.5)
    with steer(pipe, predictor, 1.0, 50.0):
        assert not torch.equal(stock_images(pipe, "sd", STEPS, 7.5), before)
        x, t, text = torch.randn(1, 4, 8, 8), pipe.scheduler.timesteps[0], pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
        as_output, as_tuple = pipe.unet(x, t, text), pipe.unet(x, t, text, return_dict=False)  # a user's own call
        assert torch.equal(as_output.sample, as_tuple[0])
        assert not torch.equal(as_output.sample, pipe.unet.forward(x, t, text).sample)  # forward itself runs no hook
    assert torch.equal(stock_images(pipe, "sd", STEPS, 7.5), before)
    with pytest.raises(KeyboardInterrupt), steer(pipe, predictor, 1.0, 50.0):
        raise KeyboardInterrupt
    with pytest.raises(InputError), steer(pipe, predictor, 1.0, 50.0):  # refused inside the pipeline's own loop
        pipe(PROMPT, num_inference_steps=2, guidance_rescale=0.7)
    with steer(pipe, trained("sd", noised=False), 1.0, 50.0, grad_path="x0"):  # a call repeated is not a second call
        assert torch.equal(stock_images(pipe, "sd", 1, 1.0), stock_images(pipe, "sd", 1, 1.0))  # of one step
    plain = steer(pipe, predictor, 1.0, 50.0).attach()  # the same as a plain attach/detach pair
    plain.detach()
    plain.detach()
    fresh = load_pipeline(MODELS["sd"])
    fresh.set_progress_bar_config(disable=True)
    assert torch.equal(stock_images(pipe, "sd", STEPS, 7.5), stock_images(fresh, "sd", STEPS, 7.5))
    assert torch.equal(stock_images(pipe, "sd", STEPS, 7.5), before)
    assert not pipe.unet._forward_hooks


def steps_taken(pipe, call: dict, **settings) -> int:
    """Run a steered call of `pipe` that is refused; return how many scheduler steps it took."""
    steps = []
    with pytest.raises(InputError) as refusal, steer(pipe, settings.pop("predictor"), 1.0, 50.0, **settings):
        pipe(PROMPT, output_type="latent", callback_on_step_end=lambda p, i, t, kw: steps.append(i) or kw, **call)
    assert "\n" not in str(refusal.value)
    return len(steps), str(refusal.value)


def test_what_the_hook_cannot_guide_is_refused_in_one_line_before_any_step(pipes, monkeypatch):
    sd, flux = pipes["sd"], pipes["flux"]
    call = {"num_inference_steps": 2}
    refused = [  # (pipe, call, steer settings, words of the message)
        (sd, {**call, "guidance_rescale": 0.7}, {"predictor": trained("sd")}, "guidance_rescale"),
        (sd, {**call, "height": 32, "width": 32}, {"predictor": trained("sd", latent_size=[8, 8])}, "4x4"),
        (flux, {**call, "height": SIZE, "width": SIZE, "true_cfg_scale": 2.0, "negative_prompt": ""},
         {"predictor": trained("flux", noised=False), "grad_path": "x0"}, "'x0'"),
    ]
    for pipe, settings_call, settings, words in refused:
        taken, message = steps_taken(pipe, settings_call, **settings)
        assert taken == 0 and words in message, message
    with steer(sd, trained("sd"), 1.0, 50.0), pytest.raises(InputError, match="steered already"):
        steer(StableDiffusionImg2ImgPipeline(**sd.components), trained("sd"), -1.0, 50.0).attach()  # the same UNet
    bad = [  # (pipe, predictor, target, guidance, settings, words)
        (sd, trained("sdxl"), 1.0, 50.0, {}, "SDXL latents"),
        (pipes["sdxl"], trained("sd"), 1.0, 50.0, {}, "SD 1.x/2.x latents"),
        (sd, trained("sd"), float("nan"), 50.0, {}, "target"),
        (sd, trained("sd"), 1.0, "auto", {}, "posterior"),
        (sd, trained("sd"), 1.0, 50.0, {"grad_path": "x0"}, "noisy latents"),
        (DDPMPipeline(UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                                  down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D")),
                      sd.scheduler), trained("sd"), 1.0, 50.0, {}, "UNet2DConditionModel (SD or SDXL)"),
    ]
    for pipe, predictor, target, guidance, settings, words in bad:
        with pytest.raises(InputError, match=re.escape(words)):
            steer(pipe, predictor, target, guidance, **settings)
    monkeypatch.setattr(sd, "scheduler", LCMScheduler.from_config(sd.scheduler.config))
    with pytest.raises(InputError, match="LCMScheduler"):
        steer(sd, trained("sd"), 1.0, 50.0).attach()
    assert not sd.unet._forward_hooks


def test_flux_tokens_are_unpacked_by_the_pipelines_own_ids_and_other_layouts_are_refused(pipes):
    ids = pipes["flux"]._prepare_latent_image_ids(1, 4, 6, "cpu", torch.float32)  # 8 x 12 latents: 4 x 6 tokens
    assert token_grid(ids, 24) == (8, 12)
    assert token_grid(torch.cat([ids, ids + 100]), 24) == (8, 12)  # tokens past the output's (FLUX Kontext's image)
    for shuffled in (ids.flip(0), ids[:, [0, 2, 1]]):
        with pytest.raises(InputError, match="row by row"):
            token_grid(shuffled, 24)
