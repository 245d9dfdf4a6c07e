"""A real Hugging Face Hub cache layout (models--org--name/{blobs,snapshots,refs}) in tmp_path, offline: the
`hub_cache` fixture (registered in conftest.py) and its helpers."""

from __future__ import annotations

import hashlib

import pytest

FILES = ("adapter_config.json", "adapter_model.safetensors")
MAIN_COMMIT = "1" * 8 + "a" * 32
V2_COMMIT = "2" * 8 + "b" * 32


def add_snapshot(repo, commit: str, source_folder, symlinks: bool) -> None:
    """One revision: files under snapshots/<commit>, as symlinks into blobs/ (the usual layout) or plain."""
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name in FILES:
        data = (source_folder / name).read_bytes()
        if symlinks:
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            (snapshot / name).symlink_to(f"../../blobs/{blob.name}")
        else:
            (snapshot / name).write_bytes(data)


def set_ref(repo, ref: str, commit: str) -> None:
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)  # huggingface_hub writes the hash without a newline


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, llama_task_dirs):
    """A Hub cache holding org/name: `main` -> MAIN_COMMIT (rte's files, symlinked blobs) and tag
    `v2` -> V2_COMMIT (mnli's files, plain files)."""
    import huggingface_hub.constants as constants

    home = tmp_path / "hf_home"
    cache = home / "hub"
    repo = cache / "models--org--name"
    add_snapshot(repo, MAIN_COMMIT, llama_task_dirs["rte"], symlinks=True)
    add_snapshot(repo, V2_COMMIT, llama_task_dirs["mnli"], symlinks=False)
    set_ref(repo, "main", MAIN_COMMIT)
    set_ref(repo, "v2", V2_COMMIT)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo
