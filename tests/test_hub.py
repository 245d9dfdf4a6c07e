"""Hub sources resolved offline through huggingface_hub's real `snapshot_download` and a real cache
layout (models--org--name/{blobs,snapshots,refs}) laid out in tmp_path; nothing is mocked but the
cache location and the offline switch.

huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE into `huggingface_hub.constants` when it is
first imported, so the tests patch those constants as well as the environment.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from hub_cache import MAIN_COMMIT, V2_COMMIT, add_snapshot, set_ref
from loramerge_cli.adapters.peft_reader import load_adapter
from loramerge_cli.errors import LoramergeError

def assert_same_weights(adapter, folder) -> None:
    local = load_adapter(str(folder))
    assert list(adapter.modules) == list(local.modules)
    for path, module in adapter.modules.items():
        assert torch.equal(module.lora_B, local.modules[path].lora_B)
        assert module.scale == local.modules[path].scale
    assert adapter.source.sha256 == local.source.sha256


@pytest.mark.parametrize("spec", ["org/name", "hf://org/name", "org/name@main", "hf://org/name@main"])
def test_default_revision_resolves_to_the_main_commit(hub_cache, llama_task_dirs, spec):
    adapter = load_adapter(spec)

    assert adapter.source.kind == "hub"
    assert adapter.source.repo_id == "org/name"
    assert adapter.source.revision == MAIN_COMMIT
    assert adapter.source.spec == spec
    assert adapter.name == "name"
    assert adapter.source.describe()["revision"] == MAIN_COMMIT
    weights = Path(adapter.source.weights_file)
    assert weights.parent.resolve() == (hub_cache / "snapshots" / MAIN_COMMIT).resolve()  # our cache, not ~/.cache
    assert_same_weights(adapter, llama_task_dirs["rte"])


@pytest.mark.parametrize("spec", [f"org/name@{V2_COMMIT}", "org/name@v2", f"hf://org/name@{V2_COMMIT}"])
def test_other_revision_by_commit_or_tag(hub_cache, llama_task_dirs, spec):
    adapter = load_adapter(f"nli={spec}")

    assert adapter.name == "nli"
    assert adapter.source.repo_id == "org/name"
    assert adapter.source.revision == V2_COMMIT
    assert_same_weights(adapter, llama_task_dirs["mnli"])


@pytest.mark.parametrize(
    "spec",
    ["org/missing", "hf://org/missing", "org/name@v9", f"org/name@{'3' * 40}"],
)
def test_missing_repo_or_revision_is_a_one_line_error(hub_cache, spec):
    with pytest.raises(LoramergeError, match="local Hugging Face cache") as error:
        load_adapter(spec)

    assert str(error.value).startswith(f"{spec}: ")
    assert "\n" not in str(error.value)


def test_a_revision_missing_offline_says_offline_and_what_the_cache_holds(hub_cache):
    """It said "the Hub cannot be reached (offline?)" under HF_HUB_OFFLINE=1, naming no cached revision."""
    with pytest.raises(LoramergeError) as error:
        load_adapter("org/name@v9")
    message = str(error.value)
    assert "HF_HUB_OFFLINE is set" in message and "offline?" not in message
    assert f"the cache holds org/name at {MAIN_COMMIT}, {V2_COMMIT}, main" in message


def test_snapshot_without_config_is_refused(hub_cache):
    (hub_cache / "snapshots" / V2_COMMIT / "adapter_config.json").unlink()

    with pytest.raises(LoramergeError, match="no adapter_config.json"):
        load_adapter("org/name@v2")


def test_a_local_folder_wins_over_a_hub_id_of_the_same_spelling(hub_cache, llama_task_dirs, tmp_path, monkeypatch):
    shutil.copytree(llama_task_dirs["mnli"], tmp_path / "org" / "name")
    monkeypatch.chdir(tmp_path)

    adapter = load_adapter("org/name")

    assert adapter.source.kind == "dir"
    assert adapter.source.repo_id is None
    assert_same_weights(adapter, llama_task_dirs["mnli"])


def test_no_output_inside_a_hub_input_s_cached_repository(hub_cache, llama_task_dirs):
    """`merge --adapters org/name … --out <cache>/models--org--name/blobs/x` (or refs/x) exited 0: the merge
    was written among the blobs that hold the input's bytes, and `scan_cache_dir` then failed on the cache.
    Only the snapshot folder was protected; the whole cached repository is the input's."""
    from factories import invoke_cli

    for inside in ("blobs", "refs", "."):
        out = hub_cache / inside / "merged"
        result = invoke_cli(["merge", "--adapters", "org/name", f"mnli={llama_task_dirs['mnli']}", "--out", out])
        assert result.exit_code == 1 and "refusing to write over an input" in result.stderr, result.stderr
        assert not out.exists()


@pytest.mark.parametrize("spec", ["org/name@..", "org/name@v2/../main", "org/name@.hidden", "org/name@main.lock"])
def test_a_revision_git_would_refuse_is_one_line(hub_cache, spec):
    """`org/name@..` read the cache's `refs/..` folder: "cannot download from the Hub: [Errno 21] Is a
    directory"."""
    with pytest.raises(LoramergeError, match=r"is not a revision \(a branch, a tag or a commit\)$"):
        load_adapter(spec)


def test_an_empty_local_folder_named_like_a_hub_id_says_how_to_ask_for_the_hub(hub_cache, tmp_path, monkeypatch):
    """An empty folder `org/name` in the working folder hides the Hub id: the error said only "folder has no
    adapter_model.safetensors"."""
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoramergeError, match="for the Hub id, write hf://org/name"):
        load_adapter("org/name")
    assert load_adapter("hf://org/name").source.kind == "hub"


def test_a_snapshot_without_weights_is_named_by_its_spec(hub_cache, llama_task_dirs):
    """A cached revision holding only adapter_config.json (an interrupted download, or a repository with
    adapter_model.bin only): the error named the cache's snapshot folder, not what the user typed, and said
    nothing of --allow-pickle; offline, it did not say that the weights may only be missing from the cache."""
    add_snapshot(hub_cache, "3" * 40, llama_task_dirs["rte"], symlinks=False)
    (hub_cache / "snapshots" / ("3" * 40) / "adapter_model.safetensors").unlink()
    set_ref(hub_cache, "partial", "3" * 40)
    with pytest.raises(LoramergeError) as caught:
        load_adapter("org/name@partial")
    assert str(caught.value) == ("org/name@partial: in its snapshot 333333333333: adapter_model.safetensors is "
                                 "not in the local cache (HF_HUB_OFFLINE is set: the Hub is not asked for it; "
                                 "download it, or unset HF_HUB_OFFLINE); a repository with adapter_model.bin only "
                                 "needs --allow-pickle")
