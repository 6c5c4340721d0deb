"""The Python API (rcgdm.pipeline) and the sweep engine under it: the API gives inference.py's images, and a
sweep samples each distinct image once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import read_rows, run_script

from rcgdm.cli import InputError
from rcgdm.files.png import load_png
from rcgdm.models import ensure_built
from rcgdm.pipeline import RewardDirectedPipeline


@pytest.fixture(scope="module")
def api(reward_model_path, predictor_path):
    return RewardDirectedPipeline.from_pretrained("tiny-random", predictor_path, reward_model_path)


def test_the_api_gives_the_scripts_images_and_rewards(tmp_path, api, reward_model_path, predictor_path):
    settings = {"target": 1.5, "guidance": 20.0, "num_images": 3, "seed": 5, "num_inference_steps": 3, "batch_size": 2}
    out = api("a nice photo", **settings)
    assert out.images.shape == (3, 3, 64, 64) and out.images.dtype == torch.float32
    assert out.predicted_rewards.shape == out.rewards.shape == out.shift.shape == (3,)

    args = ["--model", "tiny-random", "--reward_model", reward_model_path, "--predictor", predictor_path, "--target", "1.5",
            "--guidance", "20", "--num_images", "3", "--seed", "5", "--num_inference_steps", "3", "--bs", "2",
            "--out_dir", tmp_path / "run"]
    assert run_script("inference.py", *args) == 0
    rows = read_rows(tmp_path / "run" / "results.csv")
    for j, row in enumerate(rows):
        saved = load_png(tmp_path / "run" / row["file"])
        assert torch.equal(saved, (out.images[j] * 255).round() / 255)  # the PNG holds the API's image, to the bit
        assert float(row["pred"]) == out.predicted_rewards[j].item() and float(row["gt"]) == out.rewards[j].item()
    unguided = api("a nice photo", target=1.5, guidance=0.0, num_images=3, seed=5, num_inference_steps=3)
    assert (unguided.images - out.images).abs().max() > 1e-3  # the guidance acted


def test_the_api_refuses_what_the_predictor_was_not_trained_for(api, predictor_path):
    with pytest.raises(InputError, match="it serves --grad_path xt, not x0") as err:
        api("a nice photo", target=1.0, guidance=1.0, grad_path="x0", num_inference_steps=2)
    assert err.value.name == "predictor"
    with pytest.raises(InputError, match="trained on 8x8 latents") as err:
        api("a nice photo", height=32, width=32, num_inference_steps=2)
    bad_calls = (({"target": float("nan")}, "target nan is not a finite number"), ({"num_images": 0}, "num_images 0 is out"),
                 ({"height": 60}, "height 60 is not a multiple of 8"), ({"seed": -1}, "seed -1 is out of range"))
    for bad, expected in bad_calls:
        with pytest.raises(InputError, match=expected):
            api("a nice photo", **bad)
    with pytest.raises(InputError, match="trained on --model 'tiny-random'"):  # the same weights under another name
        RewardDirectedPipeline.from_pretrained(str(ensure_built("tiny-random")), predictor_path)


BAD_CALLS = [
    ({"prompt": 5}, "prompt 5 is a int; expected a text prompt"),
    ({"prompt": "a \udcff photo"}, "is not valid UTF-8 text"),
    ({"prompt": "a\x00photo"}, "holds control characters"),
    ({"target": "1.0"}, "target '1.0' is not a finite number"),
    ({"target": 10**400}, "target a int of 401 characters is not a finite number"),  # overflows a float
    ({"guidance": True}, "guidance True is not a finite number"),
    ({"cfg": float("inf")}, "cfg inf is not a finite number"),
    ({"num_images": 2.0}, "num_images 2.0 is out of range"),
    ({"num_images": 10**9}, r"num_images 1000000000 images of 64x64 in batches of 4 need at least 4.92e\+04 GB"),
    ({"batch_size": 10**30}, "batch_size 1000000000000000000000000000000 is out of range"),
    ({"height": 2**20}, "height 1048576 is out of range; expected an integer from 8 to 4096"),
    ({"num_inference_steps": 2.5}, "num_inference_steps 2.5 is not an integer"),
    ({"batch_mean": "yes"}, "batch_mean 'yes' is not True or False"),
    ({"grad_path": ["xt"]}, r"grad_path \['xt'\] is unknown"),
]


@pytest.mark.parametrize(("bad", "expected"), BAD_CALLS)
def test_every_call_argument_is_checked_before_anything_is_allocated(api, monkeypatch, bad, expected):
    monkeypatch.setattr(api, "sample", None)  # refused before any sampling
    settings = {"prompt": "a nice photo", "num_inference_steps": 2, **bad}
    with pytest.raises(InputError, match=expected) as err:
        api(**settings)
    assert "\n" not in str(err.value)


BAD_LOADS = [
    ({"model": 3}, "model 3 is a int; expected str"),
    ({"predictor": 1.5}, "predictor 1.5 is a float; expected str or Path or TrainedPredictor"),
    ({"reward_model": ["r.pth"]}, "reward_model"),
    ({"scheduler": 7}, "scheduler 7 is a int"),
    ({"device": "gpu"}, "device 'gpu' is not a device"),
    ({"device": 0}, "device 0 is a int; expected a device name or torch.device"),
    ({"device": "cuda:3"}, "device 'cuda:3' asks for CUDA but none is available"),
    ({"dtype": "fp16"}, "dtype 'fp16' is not supported"),
    ({"ignore_provenance": "no"}, "ignore_provenance 'no' is a str; expected bool"),
]


@pytest.mark.parametrize(("bad", "expected"), BAD_LOADS)
def test_every_from_pretrained_argument_is_checked(predictor_path, monkeypatch, bad, expected):
    import rcgdm.pipeline

    monkeypatch.setattr(rcgdm.pipeline, "load_pipeline", None)  # refused before any weights load
    with pytest.raises(InputError, match=expected):
        RewardDirectedPipeline.from_pretrained(**{"model": "tiny-random", "predictor": predictor_path, **bad})


def test_a_sweep_samples_each_distinct_image_once(tmp_path, monkeypatch, reward_model_path, predictor_path):
    """Unguided images do not depend on the target, and candidate k of best-of-N is the same for every N > k."""
    calls = []
    real_sample = RewardDirectedPipeline.sample

    def counting(self, prompt, reward_guidance, seed, indices, *args, **kwargs):
        calls.append(len(indices))
        return real_sample(self, prompt, reward_guidance, seed, indices, *args, **kwargs)

    monkeypatch.setattr(RewardDirectedPipeline, "sample", counting)
    args = ["--model", "tiny-random", "--reward_model", reward_model_path, "--predictor", predictor_path, "--seed", "0",
            "--target", "-1", "1", "--guidance", "0", "10", "--best_of", "1", "2", "--num_images", "2",
            "--num_inference_steps", "3", "--out_dir", tmp_path / "sweep"]
    assert run_script("inference.py", *args) == 0
    # 2 candidates x (guidance 0 for both targets, guidance 10 per target) = 6 batches of 2, where every combination
    # sampled alone would take 2 targets x 2 strengths x (1 + 2) candidates = 12
    assert calls == [2] * 6
    rows = read_rows(tmp_path / "sweep" / "results.csv")
    assert len(rows) == 16 and [float(r["unet_calls"]) for r in rows[:4]] == [4, 4, 8, 8]  # the cost of each alone

    def images(target, guidance, best_of):
        mine = [r for r in rows if (float(r["target"]), float(r["guidance"]), int(r["best_of"])) == (target, guidance, best_of)]
        return np.stack([load_png(tmp_path / "sweep" / r["file"]).numpy() for r in mine])

    assert np.array_equal(images(-1, 0, 1), images(1, 0, 1))  # one unguided set, written for both targets
    assert not np.array_equal(images(-1, 10, 1), images(1, 10, 1))
