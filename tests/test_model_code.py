"""A model folder (or hub repo) is data: one that carries code, or whose configs name code, is refused on every load path."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from types import SimpleNamespace

import pytest
from conftest import ROOT, error_line, run_script

import rcgdm.model_files
import rcgdm.models
from rcgdm.cli import UserError
from rcgdm.models import load_pipeline, load_scheduler, load_vae, model_facts

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
         "custom class", "custom_pipeline"]


@pytest.mark.parametrize("case", CASES)
def test_a_model_folder_with_code_is_refused_on_every_load_path(tmp_path, tiny_model_dir, case):
    folder, marker = tmp_path / "model", tmp_path / "pwned"
    shutil.copytree(tiny_model_dir, folder)
    expected = plant(folder, case, marker)
    for load in (load_pipeline, model_facts, load_vae, load_scheduler):  # inference's and train.py's paths
        with pytest.raises(UserError, match="code from a model is never run") as refused:
            load(str(folder))
        assert expected in str(refused.value)
    assert not marker.exists()


def test_the_scripts_refuse_it_and_create_nothing(tmp_path, capsys, tiny_model_dir, reward_model_path, predictor_path):
    folder, marker = tmp_path / "model", tmp_path / "pwned"
    shutil.copytree(tiny_model_dir, folder)
    plant(folder, "unet/modeling_unet.py", marker)
    args = ["--model", folder, "--reward_model", reward_model_path, "--predictor", predictor_path, "--ignore_provenance",
            "--out_dir", tmp_path / "out"]
    assert run_script("inference.py", *args) == 2
    assert "holds the code file 'unet/modeling_unet.py'" in error_line(capsys.readouterr().err)
    labels = tmp_path / "labels.npy"
    import numpy as np

    np.save(labels, np.zeros((8, 1), np.float32))
    out = tmp_path / "out"
    train = [f"--model={folder}", "--data=synthetic", "--num_data=8", "--image_size=64", f"--labels_path={labels}",
             "--val_fraction=0", f"--out_path={out / 'c.pth'}", f"--cache_dir={out / 'cache'}"]
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


def nest_a_pipeline(folder, marker, where: str) -> str:
    """Make the UNet a pipeline whose own model_index.json names a module beside the model (diffusers 0.38.0 to 0.42.0
    would import it) -> what the error must say."""
    (folder.parent / "evil_module_beside.py").write_text(MARKER_CODE.format(marker=str(marker)))
    nested = {"_class_name": "StableDiffusionPipeline", "unet": ["evil_module_beside", "Thing"]}
    if where == "in a dict":
        nested = {"_class_name": "StableDiffusionPipeline", "extra": {"deep": [["evil_module_beside", "Thing"]]}}
    (folder / "unet" / "model_index.json").write_text(json.dumps(nested))
    if where == "component class":
        (folder / "unet" / "model_index.json").unlink()
        edit_json(folder / "model_index.json", unet=["diffusers", "StableDiffusionPipeline"])
        return "makes the component 'StableDiffusionPipeline' a pipeline of its own"
    if where == "top-level pair in a list":
        (folder / "unet" / "model_index.json").unlink()
        edit_json(folder / "model_index.json", extra=[["evil_module_beside", "Thing"]])
        return "names a component from 'evil_module_beside'"
    return "unet/model_index.json makes a component a pipeline of its own"


@pytest.mark.parametrize("where", ["nested index", "in a dict", "component class", "top-level pair in a list"])
def test_a_pipeline_as_a_component_or_a_library_at_any_depth_is_refused(tmp_path, tiny_model_dir, monkeypatch, where):
    folder, marker = tmp_path / "model", tmp_path / "pwned"
    shutil.copytree(tiny_model_dir, folder)
    expected = nest_a_pipeline(folder, marker, where)
    monkeypatch.syspath_prepend(str(tmp_path))  # the module would be importable, as one beside the working folder is
    for load in (load_pipeline, model_facts, load_vae, load_scheduler):
        with pytest.raises(UserError, match="code from a model is never run") as refused:
            load(str(folder))
        assert expected in str(refused.value)
    assert not marker.exists() and "evil_module_beside" not in sys.modules


def test_the_check_runs_at_every_load_not_once_per_process(tmp_path, tiny_model_dir):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    assert model_facts(str(folder))["family"] == "sd"
    (folder / "unet" / "late.py").write_text("raise SystemExit('ran')\n")
    with pytest.raises(UserError, match=re.escape("holds the code file 'unet/late.py'")):
        model_facts(str(folder))
    (folder / "unet" / "late.py").unlink()
    edit_json(folder / "unet" / "config.json", auto_map={"AutoModel": "x.Y"})
    with pytest.raises(UserError, match="names custom code"):
        load_pipeline(str(folder))


def odd_config(folder, case: str) -> str:
    """Make the UNet's config odd -> what the one line must say."""
    config = folder / "unet" / "config.json"
    if case == "fifo":
        config.unlink()
        os.mkfifo(config)
        return "unet/config.json is not a regular file"
    if case == "device link":
        config.unlink()
        config.symlink_to("/dev/zero")
        return "unet/config.json is not a regular file"
    if case == "huge":
        with open(config, "ab") as f:
            f.truncate(rcgdm.model_files.MAX_CONFIG_BYTES + 1)
        return "unet/config.json holds 67108865 bytes"
    if case == "deep":
        config.write_text("[" * 100_000 + "]" * 100_000)
        return "unet/config.json is not readable JSON (RecursionError)"
    kinds = {"class list": ["UNet2DConditionModel"], "class dict": {"a": 1}, "class number": 3}
    edit_json(config, _class_name=kinds[case])
    return f"unet/config.json field '_class_name' holds a {type(kinds[case]).__name__}"


@pytest.mark.parametrize("case", ["fifo", "device link", "huge", "deep", "class list", "class dict", "class number"])
def test_odd_configs_are_one_line_never_a_hang(tmp_path, tiny_model_dir, capsys, case):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    expected = odd_config(folder, case)
    args = ["--model", folder, "--predictor", tmp_path / "none.pth", "--out_dir", tmp_path / "out"]
    assert run_script("inference.py", *args) == 2  # the model's configs are read before the predictor
    assert expected in error_line(capsys.readouterr().err)
    with pytest.raises(UserError, match=re.escape(expected)):
        load_scheduler(str(folder))  # train.py's path
    assert not (tmp_path / "out").exists()


def test_a_diffusers_below_the_floor_loads_no_model(tiny_model_dir, monkeypatch):
    import diffusers

    monkeypatch.setattr(diffusers, "__version__", "0.42.0")
    with pytest.raises(UserError, match=r"diffusers 0.42.0 is installed; expected diffusers>=0.42.1"):
        model_facts(str(tiny_model_dir))
    assert f"diffusers>={rcgdm.model_files.MIN_DIFFUSERS}," in (ROOT / "requirements.txt").read_text()  # the floor it enforces
