"""Test-wide settings (offline Hub, one torch thread) and session fixtures of real PEFT adapters."""

from __future__ import annotations

import os
import signal

os.environ["HF_HUB_OFFLINE"] = "1"
# The processes the tests start see Ctrl-C and hang-ups as a terminal's foreground job does, however pytest was
# started (under nohup, or as a script's background job with SIGINT ignored): loramerge, as it should, leaves a
# signal its parent ignores ignored, and the interrupt tests would then test nothing.
signal.signal(signal.SIGINT, signal.default_int_handler)
if hasattr(signal, "SIGHUP"):
    signal.signal(signal.SIGHUP, signal.SIG_DFL)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from hub_cache import hub_cache  # noqa: E402,F401  (the fixture, for every test module)

LLAMA_TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(autouse=True)
def _empty_working_folder(tmp_path_factory, monkeypatch):
    """Each test runs in an empty folder of its own, so no output given as a relative path (or written by a
    test that fails) lands in the repository."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def pytest_configure(config):
    # peft 0.21 calls a transformers 5 method that transformers deprecates; nothing loramerge can change.
    config.addinivalue_line("filterwarnings", "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="session")
def llama_task_dirs(tmp_path_factory):
    """Two SEQ_CLS LoRA adapters of the tiny Llama (ranks 4 and 2, different α), each with its own
    `score` head in modules_to_save: {"rte": folder, "mnli": folder}."""
    from tiny_models import save_lora

    root = tmp_path_factory.mktemp("llama_tasks")
    settings = {"rte": (11, 4, 8.0), "mnli": (12, 2, 3.0)}
    return {
        name: save_lora(
            "llama", root / name, seed, r=rank, lora_alpha=alpha, target_modules=LLAMA_TARGETS, task_type="SEQ_CLS"
        )
        for name, (seed, rank, alpha) in settings.items()
    }


@pytest.fixture(scope="session")
def gpt2_task_dirs(tmp_path_factory):
    """Two LoRA adapters on the tiny GPT-2's Conv1D layers (fan_in_fan_out): {"wiki": …, "code": …}."""
    from tiny_models import save_lora

    root = tmp_path_factory.mktemp("gpt2_tasks")
    settings = {"wiki": (21, 4), "code": (22, 3)}
    return {
        name: save_lora(
            "gpt2", root / name, seed, r=rank, lora_alpha=6.0, target_modules=["c_attn", "c_proj"],
            fan_in_fan_out=True,
        )
        for name, (seed, rank) in settings.items()
    }


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Three random adapters a, b, c (three blocks, heads) written as PEFT folders: {name: folder}."""
    from factories import write_task_folders

    return write_task_folders(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def text_setting(tmp_path_factory):
    """Three NLI-like tasks on a tiny Llama classifier: base, adapters, data and tasks.yaml (eval_fixtures)."""
    from eval_fixtures import build_text_setting

    return build_text_setting(tmp_path_factory.mktemp("text_setting"))


@pytest.fixture(scope="module")
def fixed_size_vit(tmp_path_factory):
    """A ViT on 8×8 images whose processor does not resize (do_resize false), with one adapter."""
    from eval_fixtures import build_vit_classifier, save_peft_adapter
    from transformers import ViTImageProcessor

    root = tmp_path_factory.mktemp("fixed_vit")
    base = build_vit_classifier(root / "base")
    ViTImageProcessor(size={"height": 8, "width": 8}, do_resize=False).save_pretrained(str(base))
    adapter = save_peft_adapter(base, root / "shapes", ["q_proj", "v_proj"], "AutoModelForImageClassification", None,
                                seed=5, head_modules=["classifier"])
    return base, adapter


@pytest.fixture(scope="module")
def sources(folders):
    return [str(folders[name]) for name in "abc"]


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run where a CUDA GPU is visible and are skipped elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is false)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
