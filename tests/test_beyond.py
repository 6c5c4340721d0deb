"""Beyond the paper: plug-in rewards, the x0 gradient path, best-of-N and the compute comparison."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from conftest import error_line, read_rows, run_script
from PIL import Image

from rcgdm import plots
from rcgdm.cli import UserError
from rcgdm.predictor import ThreeLayerConvNet
from rcgdm.rewards import Compressibility, build_reward, load_reward
from rcgdm.sampling.guidance import RewardGuidance


def test_compressibility_is_minus_the_jpeg_kilobytes():
    images = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    images[1] = 0.5  # a flat image compresses far better
    expected = []
    for image in images:
        buffer = io.BytesIO()
        array = np.clip(np.round(image.permute(1, 2, 0).numpy() * 255), 0, 255).astype(np.uint8)
        Image.fromarray(array).save(buffer, format="JPEG", quality=95)
        expected.append(-len(buffer.getvalue()) / 1000)
    got = Compressibility()(images)
    assert got.dtype == torch.float32 and got.shape == (3,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    assert got[1] > got[0] and got[1] > got[2]


def test_a_module_function_reward_end_to_end(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def brightness(images):\n    return images.mean(dim=(1, 2, 3))\n")
    monkeypatch.chdir(tmp_path)
    args = ["--data", "synthetic", "--num_data", "6", "--noise_std", "0", "--out_dir", tmp_path / "out"]
    assert run_script("fake_dataset.py", *args, "--reward", "my_rewards:brightness") == 0
    labels = np.load(tmp_path / "out" / "cifar10_outputs_with_noise.npy")
    from rcgdm.data import SyntheticShapes, load_batch

    expected = load_batch(SyntheticShapes(), range(6), 224).mean(dim=(1, 2, 3)).numpy()
    np.testing.assert_allclose(labels[:, 0], expected, rtol=1e-6)
    assert json.loads((tmp_path / "out" / "cifar10_outputs_with_noise.json").read_text())["reward"] == "my_rewards:brightness"
    reward, meta = load_reward(tmp_path / "out" / "reward_model.pth", "my_rewards:brightness")  # inference.py --reward
    assert meta["reward"] == "my_rewards:brightness"
    np.testing.assert_allclose(reward(load_batch(SyntheticShapes(), range(6), 64)).numpy(), expected, atol=2e-3)


@pytest.mark.parametrize(
    ("source", "spec", "message"),
    [
        (None, "no_such_module:f", "module 'no_such_module' cannot be imported"),
        ("def g(images):\n    return images.mean()\n", "bad_rewards_a:f", "has no function 'f'"),
        ("def f(images):\n    return [1.0]\n", "bad_rewards_b:f", "returned (1,) values for 4 images"),
        ("raise RuntimeError('boom')\n", "bad_rewards_c:f", "RuntimeError: boom"),
    ],
)
def test_bad_module_rewards_are_one_line(tmp_path, monkeypatch, capsys, source, spec, message):
    if source is not None:
        (tmp_path / f"{spec.split(':')[0]}.py").write_text(source)  # a module name per case: imports are cached
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["--data", "synthetic", "--num_data", "4", "--out_dir", tmp_path / "out", "--reward", spec]
    assert run_script("fake_dataset.py", *args) == 2
    assert message in error_line(capsys.readouterr().err)
    assert not (tmp_path / "out" / "reward_model.pth").exists()


def test_unknown_and_offline_rewards(capsys, tmp_path):
    with pytest.raises(UserError, match="reward 'beauty' is unknown"):
        build_reward("beauty")
    args = ["--data", "synthetic", "--num_data", "4", "--reward", "aesthetic", "--out_dir", tmp_path]
    assert run_script("fake_dataset.py", *args) == 2
    line = error_line(capsys.readouterr().err)
    assert "openai/clip-vit-large-patch14" in line and "use --reward compressibility" in line


def test_x0_path_equals_finite_differences_through_x0_hat():
    torch.manual_seed(0)
    net = ThreeLayerConvNet().double().eval()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    eps = torch.randn_like(x)
    target, guidance, a = 0.3, 4.0, 0.6

    def objective(z):  # eps held fixed
        with torch.no_grad():
            x0_hat = (z - (1 - a) ** 0.5 * eps) / a**0.5
            return 0.5 * (target - net(x0_hat)).pow(2).sum().item()

    term = RewardGuidance(net, target, guidance, grad_path="x0").apply(eps, x, a, "epsilon") - eps
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        direction = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        numeric = (objective(x + 1e-6 * direction) - objective(x - 1e-6 * direction)) / 2e-6
        assert (term * direction).sum().item() == pytest.approx((1 - a) ** 0.5 * guidance * numeric, rel=1e-5)
    assert not torch.allclose(term, RewardGuidance(net, target, guidance).apply(eps, x, a, "epsilon") - eps)


def test_the_wrong_predictor_for_the_gradient_path_is_refused(tmp_path, capsys, reward_model_path, predictor_path):
    base = ["--model", "tiny-random", "--reward_model", reward_model_path, "--num_images", "1", "--seed", "0"]
    base += ["--out_dir", tmp_path / "o"]
    assert run_script("inference.py", *base, "--predictor", predictor_path, "--grad_path", "x0") == 2
    expected = "trained on noisy latents (train.py noise=True); it serves --grad_path xt, not x0"
    assert expected in error_line(capsys.readouterr().err)

    labels = tmp_path / "labels.npy"
    np.save(labels, np.zeros((16, 1), np.float32))
    clean = tmp_path / "clean" / "convnet.pth"
    args = ["--model=tiny-random", "--data=synthetic", "--num_data=16", "--image_size=64", "--num_epochs=1", "--noise=False"]
    args += ["--val_fraction=0.25"]
    assert run_script("train.py", *args, f"--labels_path={labels}", f"--out_path={clean}", f"--cache_dir={tmp_path / 'c'}") == 0
    assert run_script("inference.py", *base, "--predictor", clean) == 2
    assert "it serves --grad_path x0, not xt" in error_line(capsys.readouterr().err)
    assert run_script("inference.py", *base, "--predictor", clean, "--grad_path", "x0", "--num_inference_steps", "2") == 0


def test_best_of_n_keeps_the_candidate_closest_to_the_target(tmp_path, reward_model_path, predictor_path):
    from rcgdm.evaluate import predicted_reward
    from rcgdm.models import load_pipeline
    from rcgdm.pipeline import RewardDirectedPipeline
    from rcgdm.predictor import load_predictor
    from rcgdm.rewards import load_reward
    from rcgdm.sampling.sampler import decode, sample_latents
    from rcgdm.seeds import image_generators
    from rcgdm.sweep.engine import SweepSettings, sample_draw
    from rcgdm.sweep.plan import Combo, draws

    sd = load_pipeline("tiny-random")
    predictor = load_predictor(predictor_path)
    reward, _ = load_reward(reward_model_path)
    pipe = RewardDirectedPipeline(sd, predictor, reward)
    settings = SweepSettings(num_images=2, batch_size=2, num_inference_steps=4, cfg=7.5)
    target, indices = -3.0, range(2)
    one, three = (Combo(0, "a nice photo", target, 0.0, n, tmp_path) for n in (1, 3))
    (draw,) = draws([one, three])  # the plain image is candidate 0 of best-of-3: sampled once for both
    kept = sample_draw(pipe, settings, draw, draw.guidance, 0, indices)

    def candidate(k):
        gens = image_generators(0, indices, k)
        images = decode(sd, sample_latents(sd, "a nice photo", gens, None, 4, progress_bar=False), gens)
        return images, predicted_reward(predictor.net, sd.vae, images)[:, 0]

    candidates = [candidate(k) for k in range(3)]
    assert torch.equal(kept[one].images, candidates[0][0])  # N = 1 is plain sampling
    preds = torch.stack([pred for _, pred in candidates])  # (3, B)
    best = (preds - target).abs().argmin(dim=0)
    for j in range(len(indices)):
        assert torch.equal(kept[three].images[j], candidates[best[j]][0][j])
        assert kept[three].predicted_rewards[j] == preds[best[j], j]
        assert kept[three].rewards[j] == reward(candidates[best[j]][0])[j]
    assert kept[three].shift is not None and kept[three].shift.shape == (len(indices),)  # the kept candidates' shift


def test_a_sweep_draws_the_compute_comparison_and_measures_every_combination(tmp_path, reward_model_path, predictor_path):
    args = ["--model", "tiny-random", "--reward_model", reward_model_path, "--predictor", predictor_path, "--seed", "0",
            "--target", "-3", "--guidance", "0", "10", "--best_of", "1", "2", "--num_images", "3",
            "--num_inference_steps", "3", "--out_dir", tmp_path / "sweep"]
    assert run_script("inference.py", *args) == 0
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())["combinations"]
    for name in ("reward_vs_compute.png", "reward_vs_distance.png"):
        assert (tmp_path / "sweep" / name).read_bytes()[:4] == b"\x89PNG"
    rows = read_rows(tmp_path / "sweep" / "results.csv")

    def images(guidance: float, best_of: int) -> list[bytes]:
        mine = [r for r in rows if float(r["guidance"]) == guidance and int(r["best_of"]) == best_of]
        return [(tmp_path / "sweep" / r["file"]).read_bytes() for r in sorted(mine, key=lambda r: int(r["image"]))]

    for c in summary:  # calibration, diversity, distance to the unguided images and cost, for every combination
        assert c["target_error"] == pytest.approx(c["gt_mean"] - c["target"]) and c["abs_target_error"] >= 0
        assert c["predictor_gap"] == pytest.approx(c["pred_mean"] - c["gt_mean"])
        assert c["diversity"] > 0 and c["diversity_vs_unguided"] > 0 and c["mmd_to_unguided_se"] >= 0
        assert c["seconds_per_image"] > 0 and c["peak_memory_bytes"] > 0
        # the unguided images themselves (best-of-N may keep them all) are at MMD^2 0 and diversity 1x; the guided ones
        # are measurably apart (a best-of-2 pick among far-apart tiny-model images may also score 0: kernels underflow)
        if images(c["guidance"], c["best_of"]) == images(0.0, 1):
            assert c["mmd_to_unguided"] == 0 and c["diversity_vs_unguided"] == 1
        if c["guidance"] == 10:
            assert c["mmd_to_unguided"] > 0 and images(10.0, c["best_of"]) != images(0.0, 1)
    drawn = plots.reward_vs_compute(summary, tmp_path / "again.png")
    assert set(drawn) == {"guidance 0", "guidance 10"}
    calls_per_sample = 4  # PNDM: 3 steps take 4 UNet calls (its first step is repeated)
    for guidance, points in zip((0.0, 10.0), (drawn["guidance 0"], drawn["guidance 10"]), strict=True):
        assert [(calls, n) for calls, _, n in points] == [(calls_per_sample, 1), (2 * calls_per_sample, 2)]
        for _, distance, n in points:
            mine = [c for c in summary if (c["guidance"], c["best_of"]) == (guidance, n)]
            assert distance == pytest.approx(np.mean([c["gt_distance"] for c in mine]))
