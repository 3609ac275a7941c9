"""Run-time adapter loading cannot reach outside the adapters directory: `..`, absolute paths
elsewhere, symlinked directories or files that lead out, bad names and pickle-only adapters are
refused, by the path checks directly and through `POST /v1/adapters` on the CLI server."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from serve_support import BASE_NAME, http

from lorakit.io import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME
from lorakit.serve.errors import ServeError
from lorakit.serve.registry import check_adapter_name, discover_adapters, resolve_adapter_dir


@pytest.fixture
def tree(tmp_path, serve_files) -> tuple[Path, Path]:
    """root/ (the adapters dir) holding good/, nested/deep/, binonly/, out_link -> outside,
    in_link -> good, file_link/ (a config here, weights symlinked from outside); outside/ next to it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    shutil.copytree(serve_files["staging"] / "outside", outside)
    shutil.copytree(serve_files["staging"] / "outside", root / "good")
    shutil.copytree(serve_files["staging"] / "outside", root / "nested" / "deep")
    (root / "binonly").mkdir()
    shutil.copy(outside / CONFIG_NAME, root / "binonly" / CONFIG_NAME)
    (root / "binonly" / PICKLE_NAME).write_bytes(b"not even a pickle")
    (root / "out_link").symlink_to(outside, target_is_directory=True)
    (root / "in_link").symlink_to(root / "good", target_is_directory=True)
    (root / "file_link").mkdir()
    shutil.copy(outside / CONFIG_NAME, root / "file_link" / CONFIG_NAME)
    (root / "file_link" / WEIGHTS_NAME).symlink_to(outside / WEIGHTS_NAME)
    return root.resolve(), outside.resolve()


def _refused(root: Path, path: str, status: int, words: str) -> None:
    with pytest.raises(ServeError) as info:
        resolve_adapter_dir(root, path)
    assert info.value.status == status and words in str(info.value), str(info.value)


def test_paths_inside_the_adapters_dir_resolve(tree):
    root, _ = tree
    assert resolve_adapter_dir(root, "good") == root / "good"
    assert resolve_adapter_dir(root, str(root / "nested" / "deep")) == root / "nested" / "deep"
    assert resolve_adapter_dir(root, "in_link") == root / "good"   # a symlink that stays inside is fine


@pytest.mark.parametrize("path, status, words", [
    ("../outside", 403, "contains '..'"),
    ("good/../../outside", 403, "contains '..'"),
    ("out_link", 403, "symlink (out_link) that leads outside"),
    ("out_link/", 403, "symlink (out_link) that leads outside"),
    ("file_link", 403, "adapter_model.safetensors is a symlink that leads outside"),
    ("binonly", 400, "a pickle, which lorakit never loads"),
    ("nested", 400, "adapter_config.json is missing"),
    ("missing", 404, "does not exist"),
    ("", 400, "non-empty string"),
    ("good\x00", 400, "non-empty string"),
])
def test_paths_leading_outside_or_to_no_safetensors_adapter_are_refused(tree, path, status, words):
    root, _ = tree
    _refused(root, path, status, words)


def test_absolute_paths_must_start_with_the_adapters_dir(tree):
    root, outside = tree
    _refused(root, str(outside), 403, "is outside the adapters directory")
    _refused(root, "/etc", 403, "is outside the adapters directory")
    _refused(root, str(root / "out_link"), 403, "leads outside")


def test_a_symlink_that_leaves_and_comes_back_is_refused(tree, tmp_path):
    """root/hop -> elsewhere/, and elsewhere/back -> root/good: resolves inside, passes outside."""
    root, _ = tree
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "back").symlink_to(root / "good", target_is_directory=True)
    (root / "hop").symlink_to(elsewhere, target_is_directory=True)
    _refused(root, "hop/back", 403, "symlink (hop) that leads outside")


@pytest.mark.parametrize("name", ["../evil", "a/b", "", "-x", "x" * 65, "has space", "dot.name", "auto", "__base__",
                                  BASE_NAME, None, 3])
def test_bad_adapter_names_are_refused(name):
    with pytest.raises(ServeError) as info:
        check_adapter_name(name, BASE_NAME)
    assert info.value.status == 400 and info.value.param == "name"


def test_discovery_loads_only_the_valid_adapter_directories(tree, caplog):
    root, _ = tree
    with caplog.at_level("WARNING", logger="lorakit.serve"):
        found = discover_adapters(root, BASE_NAME)
    assert [name for name, _ in found] == ["good", "in_link"]
    skipped = caplog.text
    for name in ("binonly", "file_link", "nested", "out_link"):
        assert f"skipping {name}" in skipped


# ---- through the API ------------------------------------------------------------------------------


@pytest.fixture
def served_tree(server, serve_files):
    """In the CLI server's adapters dir: esc_link -> staging/outside, esc_file/ with its weights
    symlinked from outside, pickle_only/; removed afterwards."""
    adapters, outside = serve_files["adapters"], serve_files["staging"] / "outside"
    made = [adapters / "esc_link", adapters / "esc_file", adapters / "pickle_only"]
    (adapters / "esc_link").symlink_to(outside, target_is_directory=True)
    (adapters / "esc_file").mkdir()
    shutil.copy(outside / CONFIG_NAME, adapters / "esc_file" / CONFIG_NAME)
    (adapters / "esc_file" / WEIGHTS_NAME).symlink_to(outside / WEIGHTS_NAME)
    (adapters / "pickle_only").mkdir()
    shutil.copy(outside / CONFIG_NAME, adapters / "pickle_only" / CONFIG_NAME)
    (adapters / "pickle_only" / PICKLE_NAME).write_bytes(b"x")
    yield server["url"] + "/v1/adapters"
    for path in made:
        if path.is_symlink():
            path.unlink()
        else:
            shutil.rmtree(path)


@pytest.mark.parametrize("body, status, words", [
    ({"name": "x1", "path": "../staging/outside"}, 403, "contains '..'"),
    ({"name": "x2", "path": "esc_link"}, 403, "leads outside"),
    ({"name": "x3", "path": "esc_file"}, 403, "is a symlink that leads outside"),
    ({"name": "x4", "path": "pickle_only"}, 400, "never loads"),
    ({"name": "x5", "path": "nowhere"}, 404, "does not exist"),
    ({"name": "../x", "path": "a0"}, 400, "is not valid"),
    ({"name": "auto", "path": "a0"}, 400, "is reserved"),
    ({"name": "a0", "path": "a0"}, 409, "already loaded"),
    ({"name": "x6"}, 400, "path is required"),
    ({"name": "x7", "path": "a0", "extra": 1}, 400, "extra"),
])
def test_the_api_refuses_loads_outside_the_adapters_dir(served_tree, body, status, words):
    got, reply = http(served_tree, "POST", body)
    assert got == status and words in reply["error"]["message"], reply


def test_the_api_refuses_an_absolute_path_outside(served_tree, serve_files):
    got, reply = http(served_tree, "POST", {"name": "abs", "path": str(serve_files["staging"] / "outside")})
    assert got == 403 and reply["error"]["type"] == "permission_error"
    got, reply = http(served_tree, "POST", {"name": "etc", "path": os.path.abspath("/etc/passwd")})
    assert got == 403


def test_the_api_loads_an_absolute_path_inside_and_unloads_it(served_tree, serve_files, client):
    got, reply = http(served_tree, "POST", {"name": "again", "path": str(serve_files["adapters"] / "a3")})
    assert got == 200 and reply["id"] == "again" and reply["parent"] == BASE_NAME
    same = [client.completions.create(model=m, prompt="Hi", max_tokens=8, temperature=0).choices[0].text
            for m in ("again", "a3")]
    assert same[0] == same[1]
    assert http(served_tree + "/again", "DELETE")[0] == 200
    got, reply = http(served_tree + "/" + BASE_NAME, "DELETE")
    assert got == 400 and "is the base model" in reply["error"]["message"]
