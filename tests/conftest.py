"""Shared fixtures: the tiny Stable Diffusion (built once per session) and script runners."""

from __future__ import annotations

import csv
import os
import random
import runpy
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"  # one thread per test process and per script it starts (set before torch loads):
# make test runs two test processes on two cores (pytest-xdist), and CPU kernels round alike in every process

import numpy as np
import pytest
import torch

torch.set_num_threads(1)  # in case torch was loaded before this file
ROOT = Path(__file__).resolve().parents[1]
LONGEST_FIRST = ("test_effect.py", "test_benchmarks.py", "test_distributed.py", "test_concurrency.py", "test_claims.py")


def pytest_collection_modifyitems(items) -> None:
    """The longest test files first, so that the two test processes of make test end together."""
    order = {name: rank for rank, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))
os.environ.setdefault("RCGDM_CACHE_DIR", tempfile.mkdtemp(prefix="rcgdm-test-cache-"))  # CI passes one to reuse
os.environ["HF_HUB_OFFLINE"] = "1"  # whatever the caller set: the tests never reach the network
for _name in [n for n in os.environ if n in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
              or n.startswith("ACCELERATE_")]:
    del os.environ[_name]  # a launcher's variables would make every script think it is one of several processes


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from rcgdm.models import ensure_built

    return ensure_built("tiny-random")


def run_script(script: str, *args: str, capsys=None) -> int:
    """Run a root script in this process as `python3 script args` (or a module, run_script("-m", module, args)); return
    its exit status. What a script changes
    for its process is put back (argv, the SIGTERM handler, the global RNGs, accelerate's state, modules imported
    from outside the repository and the installed packages), so no test sees another's leftovers."""
    saved = global_state()
    sys.argv = [script, *map(str, args)]
    try:
        if script == "-m":  # a module, as `python3 -m module args`
            sys.argv = sys.argv[1:]
            runpy.run_module(str(args[0]), run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    finally:
        restore(saved)
    return 0


def global_state() -> dict:
    return {"argv": sys.argv, "sigterm": signal.getsignal(signal.SIGTERM), "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(), "random": random.getstate(), "modules": set(sys.modules)}


def restore(saved: dict) -> None:
    from accelerate.state import PartialState

    sys.argv = saved["argv"]
    signal.signal(signal.SIGTERM, saved["sigterm"])
    torch.set_rng_state(saved["torch"])
    np.random.set_state(saved["numpy"])
    random.setstate(saved["random"])
    PartialState._reset_state()
    paths = sysconfig.get_paths()
    installed = (str(ROOT), *{paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")})
    for name in set(sys.modules) - saved["modules"]:
        where = getattr(sys.modules[name], "__file__", None)
        if where and not where.startswith(installed):  # a user module a script imported (e.g. a --reward)
            del sys.modules[name]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python3 args` in a fresh process, as a user would."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False, preexec_fn=default_signals)


def default_signals() -> None:
    """In a child, before it runs: Ctrl-C and SIGTERM act by default, whatever the test run inherited (a run started
    with `nohup` or `make test &` ignores SIGINT, and children inherit that)."""
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_DFL)


def popen(*args, log=None) -> subprocess.Popen:
    """Start `python3 args` in the repository, as a user would, with the default signal handling."""
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, stdout=log or subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=default_signals)


def wait_for(condition, timeout=300.0, process=None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        if process is not None and process.poll() is not None and not condition():
            raise AssertionError(f"process ended early with status {process.returncode}")
        time.sleep(0.05)


def read_rows(path) -> list[dict]:
    """The rows of a results.csv, as strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def weights(path) -> dict:
    """The state_dict of a predictor checkpoint."""
    return torch.load(path, weights_only=True)["state_dict"]


def error_line(stderr: str) -> str:
    """The one `error: ...` line a user error must print, checking there is no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def latent_labels(path, num_data=1024):
    """Labels that the tiny VAE's latents carry: a contrast of two latent channels' means, plus N(0, 0.1^2).

    The tiny VAE has random weights, so its latents keep little of what a random ResNet18 sees;
    learning must be shown on a signal the latents hold."""
    from rcgdm.data import open_source
    from rcgdm.latents import LatentSpec, encode
    from rcgdm.models import load_vae

    source = open_source("synthetic")
    latents = encode(load_vae("tiny-random"), source, LatentSpec("-", source.identity, num_data, 64, 0), 64, torch.device("cpu"))
    signal = latents[:, 0].mean((1, 2)) - latents[:, 1].mean((1, 2))
    noise = torch.randn(num_data, generator=torch.Generator().manual_seed(0))
    np.save(path, (0.3 * signal / signal.std() + 0.1 * noise)[:, None].numpy().astype(np.float32))
    return path


def mean_prediction(pipe, predictor, steer, images: int, steps: int, prompt: str, cfg: float = 7.5,
                    size: int | None = None) -> float:
    """The predictor's mean over the final latents of images 0..images-1 (seed 0) sampled with `steer` (None: unguided),
    size x size pixels (None: the model's)."""
    from rcgdm.sampling.sampler import sample_latents
    from rcgdm.seeds import image_generators

    latents = sample_latents(pipe, prompt, image_generators(0, range(images)), steer, steps, cfg, size, size,
                             progress_bar=False)
    with torch.no_grad():
        return predictor(latents).mean().item()


def quiet_pipelines(models: dict[str, str]) -> dict:
    """{name: the pipeline of each model, without progress bars}."""
    from rcgdm.models import load_pipeline

    pipes = {name: load_pipeline(model) for name, model in models.items()}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def stock_images(pipe, family: str, steps: int, cfg: float, distilled: float | None = None, prompt: str = "a dog",
                 size: int = 64) -> torch.Tensor:
    """The stock pipeline's images 0 and 1 (seed 0) of `prompt`, size x size pixels: FLUX's true CFG against the empty
    prompt, its distilled guidance and T5 length as the family's (schnell: diffusers' documented 256 tokens)."""
    from rcgdm.sampling.families import FAMILIES
    from rcgdm.seeds import image_generators

    if family.startswith("flux"):
        flux = FAMILIES[family]
        extra = {"true_cfg_scale": cfg, "negative_prompt": "" if cfg > 1 else None, "max_sequence_length": flux.text_length,
                 "guidance_scale": flux.distilled_guidance if distilled is None else distilled}
    else:
        extra = {"guidance_scale": cfg}
    return pipe(prompt, num_images_per_prompt=2, generator=image_generators(0, range(2)), num_inference_steps=steps,
                height=size, width=size, output_type="pt", **extra).images


def levels_used(pipe, steer, monkeypatch, images: int, steps: int, prompt: str, cfg: float = 7.5,
                size: int | None = None) -> tuple[list, torch.Tensor]:
    """Sample with `steer` (size x size pixels; None: the model's), recording the noise level the sampler hands the term
    at every model call -> (levels, latents)."""
    from rcgdm.sampling.guidance import RewardGuidance
    from rcgdm.sampling.sampler import sample_latents
    from rcgdm.seeds import image_generators

    used, real_apply = [], RewardGuidance.apply

    def recording(self, output, x_t, level, prediction_type):
        used.append(float(level))
        return real_apply(self, output, x_t, level, prediction_type)

    monkeypatch.setattr(RewardGuidance, "apply", recording)
    latents = sample_latents(pipe, prompt, image_generators(0, range(images)), steer, steps, cfg, size, size,
                             progress_bar=False)
    return used, latents


@pytest.fixture(scope="session")
def predictor_path(tmp_path_factory, tiny_model_dir) -> Path:
    """A predictor trained by train.py on labels the tiny latents carry."""
    root = tmp_path_factory.mktemp("predictor")
    labels = latent_labels(root / "labels.npy", 512)
    args = [
        "--model=tiny-random", "--data=synthetic", "--num_data=512", "--image_size=64", "--num_epochs=5", "--batch_size=32",
        "--val_fraction=0.25", f"--labels_path={labels}", f"--cache_dir={root / 'cache'}", f"--out_path={root / 'convnet.pth'}",
    ]
    assert run_script("train.py", *args) == 0
    return root / "convnet.pth"


@pytest.fixture(scope="session")
def reward_model_path(tmp_path_factory) -> Path:
    """The ground-truth reward of fake_dataset.py (random backbone)."""
    root = tmp_path_factory.mktemp("reward")
    args = ["--data", "synthetic", "--num_data", "4", "--weights", "none", "--out_dir", root]
    assert run_script("fake_dataset.py", *args) == 0
    return root / "reward_model.pth"


def small_train_args(tmp_path, labels, out_path, *extra) -> list[str]:
    """train.py on 16 synthetic images of the tiny random model, one epoch, a quarter held out."""
    return ["train.py", "--model=tiny-random", "--data=synthetic", "--num_data=16", "--image_size=64", "--num_epochs=1",
            "--val_fraction=0.25", f"--labels_path={labels}", f"--cache_dir={tmp_path / 'cache'}", f"--out_path={out_path}",
            *extra]


@pytest.fixture
def small_labels(tmp_path):
    """16 labels, 0 to 1."""
    labels = tmp_path / "labels.npy"
    np.save(labels, np.linspace(0, 1, 16, dtype=np.float32)[:, None])
    return labels


def inference_args(out, reward_model_path, predictor_path, *extra) -> list[str]:
    """inference.py on the tiny random model, seed 0, into `out`."""
    return ["inference.py", "--model", "tiny-random", "--reward_model", reward_model_path, "--predictor", predictor_path,
            "--seed", "0", "--out_dir", out, *extra]


def interrupt_at_image(monkeypatch, n: int) -> None:
    """Ctrl-C as the run starts writing its n-th image (as if pressed then): what it finished before stays."""
    from rcgdm.files import atomic

    real_atomic_path, pngs = atomic.atomic_path, []

    def interrupting(path):
        if path.suffix == ".png":
            pngs.append(path)
            if len(pngs) == n:
                raise KeyboardInterrupt
        return real_atomic_path(path)

    monkeypatch.setattr(atomic, "atomic_path", interrupting)
