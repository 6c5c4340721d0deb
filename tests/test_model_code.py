"""A model folder (or hub repo) is data: one that carries code, or whose configs name code, is refused on every load path."""

from __future__ import annotations

import json
import shutil
import sys
from types import SimpleNamespace

import pytest
from conftest import error_line, run_script

import rcgdm.model_files
import rcgdm.models
from rcgdm.cli import UserError
from rcgdm.models import check_vae, load_pipeline, load_vae, model_facts

MARKER_CODE = "from pathlib import Path\nPath({marker!r}).touch()\n"


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def plant(folder, case: str, marker) -> str:
    """Give the model folder one kind of code -> what the error must say."""
    if case in ("top.py", "unet/modeling_unet.py", "scheduler/my_scheduler.py"):
        (folder / case).write_text(MARKER_CODE.format(marker=str(marker)))
        return f"holds the code file {case!r}"
    if case == "native":
        (folder / "text_encoder" / "kernels.so").write_bytes(b"\x7fELF")
        return "holds the code file 'text_encoder/kernels.so'"
    if case == "auto_map":
        edit_json(folder / "text_encoder" / "config.json", auto_map={"AutoModel": "modeling_evil.EvilModel"})
        return "text_encoder/config.json names custom code ('auto_map')"
    if case == "tokenizer auto_map":
        edit_json(folder / "tokenizer" / "tokenizer_config.json", auto_map={"AutoTokenizer": ["evil.Tok", None]})
        return "tokenizer/tokenizer_config.json names custom code ('auto_map')"
    if case == "custom class":
        edit_json(folder / "unet" / "config.json", _class_name="MyUNetModel")
        return "unet/config.json names the class 'MyUNetModel'"
    edit_json(folder / "model_index.json", custom_pipeline="evil/pipeline")
    return "model_index.json names custom code ('custom_pipeline')"


CASES = ["top.py", "unet/modeling_unet.py", "scheduler/my_scheduler.py", "native", "auto_map", "tokenizer auto_map",
         "custom class", "custom_pipeline"]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_a_model_folder_with_code_is_refused_on_every_load_path(tmp_path, tiny_model_dir, case):
    folder, marker = tmp_path / "model", tmp_path / "pwned"
    shutil.copytree(tiny_model_dir, folder)
    expected = plant(folder, case, marker)
    for load in (load_pipeline, model_facts, load_vae, check_vae):  # inference's and train.py's paths
        with pytest.raises(UserError, match="code from a model is never run") as refused:
            load(str(folder))
        assert expected in str(refused.value)
    assert not marker.exists()


def test_the_scripts_refuse_it_and_create_nothing(tmp_path, capsys, tiny_model_dir, reward_model_path, predictor_path):
    folder, marker = tmp_path / "model", tmp_path / "pwned"
    shutil.copytree(tiny_model_dir, folder)
    plant(folder, "unet/modeling_unet.py", marker)
    args = ["--model", folder, "--reward_model", reward_model_path, "--predictor", predictor_path, "--ignore_provenance",
            "--out_dir", tmp_path / "out"]  # fmt: skip
    assert run_script("inference.py", *args) == 2
    assert "holds the code file 'unet/modeling_unet.py'" in error_line(capsys.readouterr().err)
    labels = tmp_path / "labels.npy"
    import numpy as np

    np.save(labels, np.zeros((8, 1), np.float32))
    out = tmp_path / "out"
    train = [f"--model={folder}", "--data=synthetic", "--num_data=8", "--image_size=64", f"--labels_path={labels}",
             "--val_fraction=0", f"--out_path={out / 'c.pth'}", f"--cache_dir={out / 'cache'}"]  # fmt: skip
    assert run_script("train.py", *train) == 2
    assert "holds the code file 'unet/modeling_unet.py'" in error_line(capsys.readouterr().err)
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.fixture
def hub(monkeypatch, tmp_path, tiny_model_dir):
    """A stand-in for the hub's answers (file list, commit, config download): the network is not reachable here."""
    configs = tmp_path / "configs"
    shutil.copytree(tiny_model_dir, configs, ignore=lambda _, names: [n for n in names if n.endswith(".safetensors")])
    answers = SimpleNamespace(files=["model_index.json", "unet/config.json"], downloads=[], configs=configs)

    def model_info(self, name, **kwargs):
        return SimpleNamespace(sha="0123abcd" * 5, siblings=[SimpleNamespace(rfilename=f) for f in answers.files])

    def snapshot_download(name, revision=None, allow_patterns=None, **kwargs):
        answers.downloads.append((name, revision, allow_patterns))
        return str(configs)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(rcgdm.models, "hub_offline", lambda: False)
    rcgdm.model_files.hub_revision.cache_clear()
    yield answers
    rcgdm.model_files.hub_revision.cache_clear()


def test_a_hub_repo_is_checked_then_pinned_to_that_commit(hub):
    assert rcgdm.model_files.hub_revision("org/model") == "0123abcd" * 5
    assert hub.downloads == [("org/model", "0123abcd" * 5, ["*.json"])]  # the configs of the commit whose files were listed
    assert rcgdm.models.model_fingerprint("org/model") == f"hub:org/model@{'0123abcd' * 5}"


@pytest.mark.parametrize("bad", ["file", "config"])
def test_a_hub_repo_with_code_is_refused_before_its_weights(hub, bad):
    if bad == "file":
        hub.files.append("pipeline.py")
    else:
        edit_json(hub.configs / "text_encoder" / "config.json", auto_map={"AutoModel": "x.Y"})
    with pytest.raises(UserError, match="pipeline.py" if bad == "file" else "names custom code"):
        rcgdm.model_files.hub_revision("org/model")
    fetched = [] if bad == "file" else [("org/model", "0123abcd" * 5, ["*.json"])]  # a listed .py: nothing is fetched
    assert hub.downloads == fetched


def test_a_user_reward_module_leaves_the_import_path_as_it_found_it(tmp_path, monkeypatch):
    from rcgdm.rewards.user import UserFunction

    (tmp_path / "my_reward_module.py").write_text("def f(images):\n    return images.mean((1, 2, 3))\n")
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    UserFunction("my_reward_module:f")
    assert sys.path == before
    sys.modules.pop("my_reward_module", None)
