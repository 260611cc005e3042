"""What a newcomer's first mistakes get: a message naming the fix, never a server that will not
start or a bare 404.

- `VLLM_PLUGINS` naming one of the plugin's two entry points, or misspelling one (vllm_sjdpp.plugin,
  patches.plugins);
- the images endpoint on a folder no family reads: the server starts, the route answers 400s
  naming why (serving.images_api);
- a hub id: the folder found in the local Hugging Face cache, offline (families.resolve);
- deepseek-ai's Janus release: named, with the transformers-format folder to use
  (families.foreign_format, patches.arg_utils).
No model is run: fake engines, tiny folders, vLLM's app builder.
"""

from __future__ import annotations

import json
import shutil
import types

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from vllm_sjdpp import families
from vllm_sjdpp.digits.train import DEFAULT_OUT
from vllm_sjdpp.config import ENDPOINT_PLUGIN, PLUGINS_FIX, plugins_advice
from vllm_sjdpp.plugin import require_engine_plugin
from vllm_sjdpp.serving.images_api import ROUTE, ImagesEndpoint, MissingImagesEndpoint

DEEPSEEK_CONFIG = {"model_type": "multi_modality", "architectures": ["MultiModalityCausalLM"],
                   "language_config": {"model_type": "llama"}}


# VLLM_PLUGINS --------------------------------------------------------------------------------

@pytest.mark.parametrize("value, says", [
    (None, "VLLM_PLUGINS is not set"),
    ("sjdpp", "does not name sjdpp_images"),
    ("sjdpp_images", "without sjdpp"),
    ("sjdpp, sjdpp_images", "matches plugin names exactly"),
    ("sjdpp,SJDPP_IMAGES", "matches plugin names exactly"),
])
def test_each_plugins_mistake_is_named_with_the_fix(value, says):
    advice = plugins_advice(value)
    assert says in advice and PLUGINS_FIX in advice


@pytest.mark.parametrize("value", ["sjdpp,sjdpp_images", "sjdpp_images,sjdpp", "other,sjdpp,sjdpp_images"])
def test_right_plugins_get_no_advice(value):
    assert plugins_advice(value) is None


def test_the_endpoint_without_the_engine_plugin_stops_with_the_fix(monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", "sjdpp_images")
    with pytest.raises(SystemExit, match="names sjdpp_images without sjdpp") as e:
        require_engine_plugin()
    assert PLUGINS_FIX in str(e.value)
    monkeypatch.setenv("VLLM_PLUGINS", " sjdpp,sjdpp_images")
    with pytest.raises(SystemExit, match="exactly"):
        require_engine_plugin()
    for fine in ("sjdpp,sjdpp_images", None):
        if fine is None:
            monkeypatch.delenv("VLLM_PLUGINS")
        else:
            monkeypatch.setenv("VLLM_PLUGINS", fine)
        require_engine_plugin()  # no exit


def test_setup_registers_the_endpoint_name_as_a_general_plugin_too():
    """vLLM filters general plugins by VLLM_PLUGINS: only a general entry point named like the
    endpoint runs where VLLM_PLUGINS names the endpoint alone."""
    import ast
    from pathlib import Path

    setup = Path(__file__).resolve().parents[1] / "setup.py"
    text = setup.read_text()
    tree = ast.parse(text)
    entry = next(kw.value for node in ast.walk(tree) if isinstance(node, ast.Call)
                 for kw in node.keywords if kw.arg == "entry_points")
    points = ast.literal_eval(entry)
    assert f"{ENDPOINT_PLUGIN} = vllm_sjdpp.plugin:require_engine_plugin" in points["vllm.general_plugins"]
    assert any(p.startswith(f"{ENDPOINT_PLUGIN} = ") for p in points["vllm.endpoint_plugins"])
    from importlib.metadata import entry_points  # and the install vLLM reads them from

    installed = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert installed.get(ENDPOINT_PLUGIN) == "vllm_sjdpp.plugin:require_engine_plugin", "reinstall: pip install -e ."


def _app_with_endpoint_plugins(monkeypatch, loaded: list) -> FastAPI:
    """vLLM's own route attachment, with its plugin discovery replaced by `loaded` and the
    plugin's patch laid over it."""
    import vllm.plugins

    from vllm.plugins.endpoint_plugins.interface import attach_endpoint_plugins
    from vllm_sjdpp.patches import plugins as plugins_patch

    monkeypatch.setattr(vllm.plugins, "load_endpoint_plugins", lambda supported_tasks=None: list(loaded))
    plugins_patch.apply()
    app = FastAPI()
    attach_endpoint_plugins(app, ("generate",))
    return app


def test_the_images_route_without_its_plugin_is_a_404_naming_the_fix(monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", "sjdpp")
    app = _app_with_endpoint_plugins(monkeypatch, [])
    assert [type(p) for p in app.state.endpoint_plugins] == [MissingImagesEndpoint]
    response = TestClient(app).post(ROUTE, json={"prompt": "a handwritten 3"})
    error = response.json()["error"]
    assert response.status_code == 404 and "does not name sjdpp_images" in error["message"] and PLUGINS_FIX in error["message"]


def test_the_stand_in_never_shadows_another_plugins_images_route(monkeypatch):
    """vLLM lets a later plugin's route replace an earlier one on the same path and method."""
    class OtherImages:
        name, required_tasks = "other_images", None

        def attach_router(self, app):
            @app.post(ROUTE)
            async def other():
                return {"from": "other"}

        async def init_state(self, engine_client, state, args):
            pass

    monkeypatch.setenv("VLLM_PLUGINS", "sjdpp,other_images")
    app = _app_with_endpoint_plugins(monkeypatch, [OtherImages()])
    assert [type(p) for p in app.state.endpoint_plugins] == [MissingImagesEndpoint, OtherImages]
    assert TestClient(app).post(ROUTE, json={}).json() == {"from": "other"}


def test_the_images_route_with_its_plugin_is_the_plugins(monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", "sjdpp,sjdpp_images")
    app = _app_with_endpoint_plugins(monkeypatch, [ImagesEndpoint()])
    assert [type(p) for p in app.state.endpoint_plugins] == [ImagesEndpoint]
    response = TestClient(app).post(ROUTE, json={"prompt": "a handwritten 3"})
    assert response.status_code == 503  # the real route, with no engine in this test


# The images endpoint on a folder it cannot serve ---------------------------------------------

def _engine_serving(folder) -> types.SimpleNamespace:
    model_config = types.SimpleNamespace(model=str(folder), revision=None)
    return types.SimpleNamespace(model_config=model_config)


@pytest.mark.parametrize("config, says", [
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "belong to no image family"),
    (DEEPSEEK_CONFIG, "deepseek-community/Janus-Pro-7B"),
    (None, "no config.json"),
])
def test_an_unservable_folder_starts_and_answers_400s_naming_why(tmp_path, config, says):
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    endpoint = ImagesEndpoint()
    app = FastAPI()
    endpoint.attach_router(app)
    args = types.SimpleNamespace(served_model_name=None, model=str(tmp_path))
    import asyncio

    asyncio.run(endpoint.init_state(_engine_serving(tmp_path), app.state, args))  # does not raise
    response = TestClient(app).post(ROUTE, json={"prompt": "a cat"})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "model" and says in error["message"]


# Folders: hub ids and foreign formats --------------------------------------------------------

def _cache_with(tmp_path, repo_id: str, folder) -> None:
    """A Hugging Face hub cache holding `folder` as `repo_id`'s main revision (its layout)."""
    commit = "0" * 40
    repo = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_a_hub_id_is_found_in_the_local_cache_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    _cache_with(tmp_path, "someone/digits", DEFAULT_OUT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    family = families.load("someone/digits")
    assert family.name == "digits" and family.folder.name == "0" * 40
    assert family.prompt_ids("a handwritten 3") == families.load(DEFAULT_OUT).prompt_ids("a handwritten 3")
    with pytest.raises(FileNotFoundError, match="hf download someone/other"):
        families.load("someone/other")


def test_a_folder_path_is_never_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(DEFAULT_OUT, tmp_path / "local" / "digits")
    assert families.load("local/digits").folder.resolve() == tmp_path / "local" / "digits"
    for missing in ("./missing", "../x/y", "local/missing"):  # a path, or a hub id no cache holds
        with pytest.raises(FileNotFoundError, match="missing|x/y"):
            families.load(missing)


def test_a_hub_id_is_found_in_vllms_download_dir(tmp_path, monkeypatch):
    from huggingface_hub import constants

    _cache_with(tmp_path, "someone/digits", DEFAULT_OUT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError):
        families.load("someone/digits")
    assert families.load("someone/digits", download_dir=str(tmp_path / "hub")).name == "digits"


def test_the_deepseek_janus_format_is_named_with_the_folder_to_use(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(DEEPSEEK_CONFIG))
    with pytest.raises(ValueError, match="deepseek-community/Janus-Pro-7B"):
        families.load(tmp_path)


def test_vllm_serve_of_the_deepseek_janus_format_names_the_folder_to_use(tmp_path):
    """vLLM's own config loading fails on this folder (transformers knows no 'multi_modality');
    the patched EngineArgs says why."""
    from vllm.engine.arg_utils import EngineArgs

    (tmp_path / "config.json").write_text(json.dumps(DEEPSEEK_CONFIG))
    args = EngineArgs(model=str(tmp_path), skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="deepseek-community/Janus-Pro-7B") as e:
        args.create_model_config()
    assert e.value.__cause__ is not None  # vLLM's own error kept as the cause
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_type"}))
    with pytest.raises(Exception) as other:  # another folder's failure is vLLM's own
        EngineArgs(model=str(tmp_path), skip_tokenizer_init=True).create_model_config()
    assert "deepseek" not in str(other.value)
