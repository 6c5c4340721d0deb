"""Hostile and damaged files: pickles that would run code, rewards naming user code, model folders naming other
libraries, truncated checkpoints and labels."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import ROOT, error_line, run_script

from rcgdm.cli import UserError


class WritesAMarker:
    """Unpickling this runs code: it would create the file `path`."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def hostile_checkpoint(path, marker):
    torch.save({"format": "rcgdm.predictor/1", "state_dict": {}, "payload": WritesAMarker(str(marker))}, path)
    return path



# --- hostile and damaged files --------------------------------------------------------------------------------------------------


def test_a_code_running_pickle_is_refused_everywhere(tmp_path, capsys, reward_model_path, predictor_path):
    marker = tmp_path / "pwned"
    bad = hostile_checkpoint(tmp_path / "bad.pth", marker)
    base = ["--model", "tiny-random", "--num_images", "1", "--num_inference_steps", "2", "--seed", "0",
            "--out_dir", tmp_path / "out"]
    assert run_script("inference.py", *base, "--reward_model", bad, "--predictor", predictor_path) == 2
    assert "cannot be loaded safely" in error_line(capsys.readouterr().err)
    assert run_script("inference.py", *base, "--reward_model", reward_model_path, "--predictor", bad) == 2
    assert "cannot be loaded safely" in error_line(capsys.readouterr().err)

    labels = tmp_path / "labels.npy"
    np.save(labels, np.zeros((8, 1), np.float32))
    out = tmp_path / "train" / "convnet.pth"
    out.parent.mkdir()
    hostile_checkpoint(out.with_suffix(".resume.pth"), marker)
    args = ["--model=tiny-random", "--data=synthetic", "--num_data=8", "--image_size=64", "--val_fraction=0",
            f"--labels_path={labels}"]
    assert run_script("train.py", *args, f"--out_path={out}", f"--cache_dir={tmp_path / 'cache'}", "--resume=True") == 2
    assert "cannot be loaded safely" in error_line(capsys.readouterr().err)
    assert not marker.exists()


MARKER_MODULE = "from pathlib import Path\nPath({marker!r}).touch()\n\ndef f(images):\n    return images.mean((1, 2, 3))\n"


def user_code(tmp_path, name):
    """A module `name`.py whose import creates the file `pwned` beside it -> (module file, marker)."""
    marker = tmp_path / "pwned"
    module = tmp_path / f"{name}.py"
    module.write_text(MARKER_MODULE.format(marker=str(marker)))
    return module, marker


@pytest.mark.parametrize("kind", ["file", "module"])
def test_a_reward_file_naming_user_code_never_runs_it(tmp_path, capsys, monkeypatch, predictor_path, kind):
    module, marker = user_code(tmp_path, "evil_reward")
    monkeypatch.syspath_prepend(str(tmp_path))  # importable by name too, so only our refusal keeps it from running
    monkeypatch.chdir(tmp_path)
    spec = f"{module}:f" if kind == "file" else "evil_reward:f"
    crafted = tmp_path / "reward_model.pth"
    torch.save({"format": "rcgdm.reward/1", "reward": spec, "state_dict": {}}, crafted)
    out = tmp_path / "out"
    base = ["--model", "tiny-random", "--num_images", "1", "--num_inference_steps", "2", "--seed", "0", "--out_dir", out,
            "--reward_model", crafted, "--predictor", predictor_path]
    assert run_script(str(ROOT / "inference.py"), *base) == 2
    line = error_line(capsys.readouterr().err)
    assert f"records the user-code reward {spec!r}" in line and f"pass --reward {spec!r}" in line
    assert run_script(str(ROOT / "inference.py"), *base, "--reward", "other:f") == 2
    assert "does not match the reward" in error_line(capsys.readouterr().err)
    assert not marker.exists() and not out.exists()

    from rcgdm.rewards import load_reward

    reward, _ = load_reward(crafted, user_reward=spec)  # named by the user: now it may run
    assert marker.exists()
    assert torch.allclose(reward(torch.full((2, 3, 8, 8), 0.25)), torch.tensor([0.25, 0.25]))


@pytest.mark.parametrize(("field", "expected"), [
    (["a", "list"], "field 'reward' is ['a', 'list']; expected a reward name"),
    ("", "field 'reward' is ''; expected a reward name"),
    ("resnet50", "records the reward 'resnet50'; expected one of resnet18-random, compressibility, aesthetic"),
])
def test_a_reward_file_with_a_bad_reward_field_is_refused(tmp_path, field, expected):
    from rcgdm.rewards import load_reward

    crafted = tmp_path / "reward_model.pth"
    torch.save({"format": "rcgdm.reward/1", "reward": field, "state_dict": {}}, crafted)
    with pytest.raises(UserError) as refused:  # matched on the field, not on a path that holds "reward" anyway
        load_reward(crafted)
    assert expected in str(refused.value)


def test_a_model_folder_naming_another_library_is_refused_before_any_import(tmp_path, capsys, monkeypatch, tiny_model_dir):
    _, marker = user_code(tmp_path, "evil_library")
    monkeypatch.syspath_prepend(str(tmp_path))
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "unet": ["evil_library", "UNet"]}))
    from rcgdm.models import load_pipeline

    with pytest.raises(UserError, match="names a component from 'evil_library'"):
        load_pipeline(str(folder))
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLImg2ImgPipeline"}))
    with pytest.raises(UserError, match="is a 'StableDiffusionXLImg2ImgPipeline': an image-to-image pipeline"):
        load_pipeline(str(folder))
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(UserError, match=r"says StableDiffusionXLPipeline, but unet/config\.json has no 'text_time'"):
        load_pipeline(str(folder))
    assert not marker.exists()


def test_an_sd_label_on_an_sdxl_unet_is_refused_from_the_configs(tmp_path, monkeypatch):
    from rcgdm.models import ensure_built, load_pipeline

    folder = tmp_path / "model"
    shutil.copytree(ensure_built("tiny-sdxl-random"), folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    monkeypatch.setattr("diffusers.StableDiffusionPipeline.from_pretrained", None)  # refused before any weights load
    with pytest.raises(UserError, match=r"says StableDiffusionPipeline, but unet/config\.json has SDXL's 'text_time'"):
        load_pipeline(str(folder))


@pytest.mark.parametrize(("component", "field", "value"), [("vae", "latent_channels", 8), ("transformer", "in_channels", 16),
                                                       ("transformer", "out_channels", 32)])
def test_a_vae_and_denoiser_that_disagree_on_the_latents_are_refused_from_the_configs(tmp_path, monkeypatch, component,
                                                                                      field, value):
    """A FLUX folder whose VAE makes other latents than its transformer takes (4 x 16 packed channels) or returns: one
    line, before any weights load, never a traceback at decode."""
    from rcgdm.models import ensure_built, load_pipeline

    folder = tmp_path / "model"
    shutil.copytree(ensure_built("tiny-flux-random"), folder)
    config = folder / component / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), field: value}))
    monkeypatch.setattr("diffusers.FluxPipeline.from_pretrained", None)  # refused before any weights load
    with pytest.raises(UserError, match=r"vae/config\.json makes \d+-channel latents, and transformer/config\.json takes "
                                        r"\d+ and returns \d+ channels; expected the denoiser to take and return"):
        load_pipeline(str(folder))


@pytest.mark.parametrize("steps", [1, 3])
def test_pndm_with_its_warm_up_on_too_few_steps_is_one_line(tmp_path, capsys, tiny_model_dir, predictor_path,
                                                            reward_model_path, steps):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "skip_prk_steps": False}))
    args = ["--model", folder, "--predictor", predictor_path, "--ignore_provenance", "--num_inference_steps", steps,
            "--reward_model", reward_model_path, "--out_dir", tmp_path / "out"]
    assert run_script("inference.py", *args) == 2
    assert f"--num_inference_steps {steps} is too few for PNDMScheduler" in error_line(capsys.readouterr().err)
    from rcgdm.pipeline import RewardDirectedPipeline

    pipe = RewardDirectedPipeline.from_pretrained(str(folder), predictor_path, ignore_provenance=True)
    with pytest.raises(UserError, match=f"{steps} is too few for PNDMScheduler .*at least 4 steps"):
        pipe("", num_inference_steps=steps)
    labels = tmp_path / "labels.npy"
    np.save(labels, np.zeros((8, 1), np.float32))
    train = [f"--model={folder}", "--data=synthetic", "--num_data=8", "--image_size=32", f"--labels_path={labels}",
             "--val_fraction=0", f"--num_inference_steps={steps}", f"--out_path={tmp_path / 'out' / 'c.pth'}",
             f"--cache_dir={tmp_path / 'c'}"]
    assert run_script("train.py", *train) == 2
    assert "at least 4 steps for PNDM's Runge-Kutta warm-up" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("which", ["reward_model", "predictor"])
def test_truncated_checkpoints_name_the_file(tmp_path, capsys, reward_model_path, predictor_path, which):
    paths = {"reward_model": reward_model_path, "predictor": predictor_path}
    broken = tmp_path / f"{which}.pth"
    broken.write_bytes(paths[which].read_bytes()[:5000])
    paths[which] = broken
    args = ["--model", "tiny-random", "--num_images", "1", "--seed", "0", "--out_dir", tmp_path / "out"]
    assert run_script("inference.py", *args, "--reward_model", paths["reward_model"], "--predictor", paths["predictor"]) == 2
    line = error_line(capsys.readouterr().err)
    assert str(broken) in line and "cannot be loaded safely" in line


def test_truncated_labels_name_the_file(tmp_path, capsys):
    labels = tmp_path / "labels.npy"
    np.save(labels, np.zeros((64, 1), np.float32))
    labels.write_bytes(labels.read_bytes()[:100])
    args = ["--model=tiny-random", "--data=synthetic", "--num_data=8", f"--labels_path={labels}",
            f"--out_path={tmp_path / 'c.pth'}"]
    assert run_script("train.py", *args) == 2
    line = error_line(capsys.readouterr().err)
    assert str(labels) in line and "not a readable .npy file" in line
