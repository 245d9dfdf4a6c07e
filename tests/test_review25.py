"""Review of session 25: each test failed before its fix."""

from pathlib import Path

import pytest


def _image_folder(folder: Path, sizes: list[tuple[int, int]]) -> None:
    from PIL import Image

    for index, size in enumerate(sizes):
        (folder / ("circle", "square", "star")[index % 3]).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (index * 40 % 256, 90, 200)).save(folder / ("circle", "square", "star")[index % 3]
                                                                 / f"{index}.png")


def _engine(fixed_size_vit, tmp_path, monkeypatch, sizes, **settings):
    """An Evaluator of the images; the base's weights must not load (the refusal comes first)."""
    from eval_fixtures import write_tasks_file

    from loramerge_cli import api
    from loramerge_cli.evaluation import engine

    base, adapter = fixed_size_vit
    _image_folder(tmp_path / "images", sizes)
    spec = write_tasks_file(tmp_path / "tasks.yaml", {"base_model": str(base), "model_type": "image-classification",
                                                      "tasks": [{"name": "shapes", "data": {"validation": "images"}}]})

    def no_weights(*args, **kwargs):
        raise AssertionError("the base model's weights loaded before the refusal")

    monkeypatch.setattr(engine, "load_base", no_weights)
    return api.evaluate(spec, api.load_adapters([f"shapes={adapter}"]), settings=api.EvalSettings(threads=1,
                                                                                                  **settings))


def test_images_of_a_size_the_model_refuses_are_refused_before_the_weights_load(fixed_size_vit, tmp_path,
                                                                                 monkeypatch):
    """16×16 images for a ViT built for 8×8, with a processor that does not resize: the refusal came from the first
    forward pass, after the base model had loaded (minutes for a real one)."""
    from loramerge_cli.errors import LoramergeError

    with pytest.raises(LoramergeError, match=r"^task shapes: the model refuses its inputs: Input image size "
                                             r"\(16\*16\) doesn't match model \(8\*8\)"):
        _engine(fixed_size_vit, tmp_path, monkeypatch, [(16, 16)] * 3)


def test_images_of_several_sizes_in_one_batch_are_refused_before_the_weights_load(fixed_size_vit, tmp_path,
                                                                                   monkeypatch):
    from loramerge_cli.errors import LoramergeError

    with pytest.raises(LoramergeError, match=r"^task shapes: the images differ in size \(8×8, 9×9\)"):
        _engine(fixed_size_vit, tmp_path, monkeypatch, [(8, 8), (8, 8), (9, 9)])
    # one image per batch: the processor stacks nothing, and the model refuses the 9×9 one
    with pytest.raises(LoramergeError, match=r"^task shapes: the model refuses its inputs: Input image size \(9\*9\)"):
        _engine(fixed_size_vit, tmp_path / "single", monkeypatch, [(8, 8), (8, 8), (9, 9)], batch_size=1)


def test_images_the_model_takes_pass_the_check(fixed_size_vit, tmp_path, monkeypatch):
    """The check refuses nothing the model scores: 8×8 images load the weights (the patched loader says so)."""
    with pytest.raises(AssertionError, match="weights loaded"):
        _engine(fixed_size_vit, tmp_path, monkeypatch, [(8, 8)] * 3)


def test_checked_image_size_is_the_turned_image_size(tmp_path):
    """An EXIF orientation of 6 (a phone's portrait photo) turns an 8×16 image into a 16×8 one."""
    from PIL import Image

    from loramerge_cli.evaluation.batches import check_image, decoded_image

    image = Image.new("RGB", (8, 16))
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "photo.jpg", exif=exif.tobytes())
    image.save(tmp_path / "plain.jpg")
    assert check_image(str(tmp_path / "photo.jpg")) == decoded_image(str(tmp_path / "photo.jpg")).size == (16, 8)
    assert check_image(str(tmp_path / "plain.jpg")) == (8, 16)


@pytest.fixture
def hub_base(text_setting, tmp_path, monkeypatch):
    """An offline Hub cache holding the text setting's base as `org/base`: `main` -> its weights, `v2` -> another
    model's weights (another seed)."""
    import hashlib

    import huggingface_hub.constants as constants

    repo = tmp_path / "hf" / "hub" / "models--org--base"
    from eval_fixtures import build_llama_classifier

    scaled = build_llama_classifier(tmp_path / "other", seed=7) / "model.safetensors"
    for commit, replaced in (("a" * 40, {}), ("b" * 40, {"model.safetensors": scaled})):
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        (repo / "blobs").mkdir(exist_ok=True)
        for file in text_setting.base.iterdir():
            data = replaced.get(file.name, file).read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            (snapshot / file.name).symlink_to(f"../../blobs/{blob.name}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    (repo / "refs" / "v2").write_text("b" * 40)
    for name, value in (("HF_HOME", tmp_path / "hf"), ("HF_HUB_CACHE", tmp_path / "hf" / "hub")):
        monkeypatch.setenv(name, str(value))
        monkeypatch.setattr(constants, name, str(value))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo


def _base_scores(text_setting, base):
    import json

    from factories import invoke_cli

    result = invoke_cli(["eval", "--adapters", *[f"{n}={f}" for n, f in text_setting.adapters.items()], "--tasks",
                         text_setting.tasks_file, "--base", base, "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    return report["base_model"], report["rows"][0]["accuracy"]


def test_a_hub_base_takes_a_revision_and_is_recorded_at_its_commit(text_setting, hub_base):
    """`--base org/name@rev` was refused ("a base model is a folder or a Hub id without @revision"), and
    `--base hf://org/name` was refused by eval ("no such folder, and not a Hugging Face Hub id")."""
    main = _base_scores(text_setting, "org/base")
    assert main[0] == "org/base@" + "a" * 40
    assert _base_scores(text_setting, "hf://org/base@main") == main
    assert _base_scores(text_setting, "org/base@" + "a" * 40) == main
    v2 = _base_scores(text_setting, "org/base@v2")
    assert v2[0] == "org/base@" + "b" * 40
    assert v2[1] != main[1]  # the revision's weights were loaded (they score otherwise)


def test_a_tuned_merge_rebuilds_on_the_commit_it_read(text_setting, hub_base, tmp_path):
    """A recipe recorded `base: org/base`: rebuilt after `main` moved, the merge read other weights (another λ,
    other RegMean factors) without a word."""
    import json

    from factories import invoke_cli

    adapters = [f"{n}={f}" for n, f in text_setting.adapters.items()]
    first = tmp_path / "first"
    result = invoke_cli(["merge", "--adapters", *adapters, "--merger", "regmean", "--tasks", text_setting.tasks_file,
                         "--base", "org/base", "--threads", "1", "--val-limit", "4", "--out", first])
    assert result.exit_code == 0, result.output
    assert "base: org/base@" + "a" * 40 in (first / "loramerge.yaml").read_text()
    config = json.loads((first / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("org/base", "a" * 40)
    assert json.loads((first / "loramerge.json").read_text())["base_model"] == "org/base@" + "a" * 40
    (hub_base / "refs" / "main").write_text("b" * 40)
    result = invoke_cli(["merge", "--config", first / "loramerge.yaml", "--threads", "1", "--out", tmp_path / "again"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "again" / "adapter_model.safetensors").read_bytes() == \
        (first / "adapter_model.safetensors").read_bytes()
    moved = tmp_path / "moved"  # (the check can fail: the moved branch's base gives other factors)
    result = invoke_cli(["merge", "--adapters", *adapters, "--merger", "regmean", "--tasks", text_setting.tasks_file,
                         "--base", "org/base", "--threads", "1", "--val-limit", "4", "--out", moved])
    assert result.exit_code == 0, result.output
    assert (moved / "adapter_model.safetensors").read_bytes() != (first / "adapter_model.safetensors").read_bytes()


def test_a_plain_merge_writes_the_base_revision_into_the_config(text_setting, hub_base, tmp_path):
    import json

    from factories import invoke_cli

    result = invoke_cli(["merge", "--adapters", *[f"{n}={f}" for n, f in text_setting.adapters.items()], "--merger",
                         "ties", "--base", "hf://org/base@v2", "--out", tmp_path / "m"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("org/base", "v2")


def test_resume_after_a_hub_branch_moved_names_the_repository(tmp_path):
    """The refusal said `…/models--org--a/blobs/1ebe… is gone since the run started` while the blob was there:
    only the branch had moved."""
    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.search.rundir import check_inputs

    repository = tmp_path / "hub" / "models--org--a"
    (repository / "blobs").mkdir(parents=True)
    old, new = repository / "blobs" / "1ebe", repository / "blobs" / "77aa"
    for blob, commit in ((old, "c" * 40), (new, "d" * 40)):
        blob.write_bytes(blob.name.encode())
        (repository / "snapshots" / commit).mkdir(parents=True)
        (repository / "snapshots" / commit / "adapter_model.safetensors").symlink_to(blob)
    with pytest.raises(LoramergeError, match=r"^--resume: since the run started, the Hub repository org/a resolves "
                                             r"to other files \(a branch or tag moved; the run read commit c{40}\)"):
        check_inputs({str(old): "x"}, {str(new): "y"})
    with pytest.raises(LoramergeError, match="is gone since the run started"):  # outside a cache: as before
        check_inputs({str(tmp_path / "a.safetensors"): "x"}, {})


def test_a_push_without_a_token_is_refused_before_the_merge(sources, tmp_path, monkeypatch):
    """With no token, the whole merge ran, then the upload failed ("Name or service not known")."""
    import huggingface_hub.constants as constants

    from factories import invoke_cli

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # (no stored token there)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf" / "stored_tokens"))
    result = invoke_cli(["merge", "--adapters", *sources, "--out", tmp_path / "m", "--push-to-hub", "me/merged"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: --push-to-hub me/merged: no Hugging Face token"), result.stderr
    assert not (tmp_path / "m").exists()
    assert invoke_cli(["merge", "--adapters", *sources, "--out", tmp_path / "d", "--push-to-hub", "me/merged",
                       "--dry-run"]).exit_code == 0


def test_a_failed_upload_still_reports_the_merge_in_json(sources, tmp_path, monkeypatch):
    """Under --json, stdout was empty when the upload failed: the report of a merge that was written was lost."""
    import json

    import huggingface_hub
    import huggingface_hub.constants as constants

    from factories import invoke_cli

    def unreachable(*args, **kwargs):
        raise OSError("Cannot reach https://huggingface.co: connection refused")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", unreachable)
    result = invoke_cli(["merge", "--adapters", *sources, "--out", tmp_path / "m", "--push-to-hub", "me/merged",
                         "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["format"] == "loramerge.merge/v1" and report["modules"]
    assert report["push"]["repo_id"] == "me/merged" and "upload failed" in report["push"]["error"]
    assert result.stderr.splitlines()[-1].startswith("error: --push-to-hub me/merged: upload failed")


def test_a_tuned_merge_still_checks_the_spec_base_against_the_adapters(text_setting, tmp_path):
    """(Pinning the base in the plan must not skip the spec-against-adapters check that an Evaluator without
    --base makes.)"""
    import shutil

    import yaml

    from factories import invoke_cli

    shutil.copytree(text_setting.base, tmp_path / "other")
    spec = yaml.safe_load(text_setting.tasks_file.read_text())
    spec["base_model"] = str(tmp_path / "other")
    for task in spec["tasks"]:
        task["data"] = {split: str(text_setting.tasks_file.parent / path) for split, path in task["data"].items()}
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump(spec))
    result = invoke_cli(["merge", "--adapters", *[f"{n}={f}" for n, f in text_setting.adapters.items()], "--merger",
                         "ta", "--lambda", "auto", "--tasks", tmp_path / "tasks.yaml", "--threads", "1", "--out",
                         tmp_path / "m"])
    assert result.exit_code == 1 and "--allow-base-mismatch overrides" in result.stderr, result.stderr


def test_a_recipe_cannot_allow_pickles_and_none_records_it(sources, tmp_path):
    """A recipe carried `allow-pickle: true` (written by a merge given --allow-pickle, and in its model card) and
    turned unpickling on for whoever ran it, while `force: true` was refused."""
    from factories import invoke_cli

    merged = tmp_path / "m"
    result = invoke_cli(["merge", "--adapters", *sources, "--allow-pickle", "--out", merged])
    assert result.exit_code == 0, result.output
    assert "allow-pickle" not in (merged / "loramerge.yaml").read_text()
    recipe_section = (merged / "README.md").read_text().split("## Recipe", 1)[1]  # (its Command: the exact line)
    assert "allow-pickle" not in recipe_section
    (merged / "recipe.yaml").write_text((merged / "loramerge.yaml").read_text() + "allow-pickle: true\n")
    result = invoke_cli(["merge", "--config", merged / "recipe.yaml", "--out", tmp_path / "again"])
    assert result.exit_code == 2 and "allow-pickle is given on the command line only" in result.stderr, result.stderr
    for no in ("false", "'false'", "'no'", "0"):
        (merged / "recipe.yaml").write_text((merged / "loramerge.yaml").read_text() + f"allow-pickle: {no}\n")
        result = invoke_cli(["merge", "--config", merged / "recipe.yaml", "--out", tmp_path / "again", "--force"])
        assert result.exit_code == 0, (no, result.output)


def test_a_usage_error_about_a_recipe_value_says_it_comes_from_the_recipe(sources, tmp_path):
    """`--merger ta` over a della recipe said "--density does not apply to method ta": a flag never typed."""
    from factories import invoke_cli

    merged = tmp_path / "m"
    assert invoke_cli(["merge", "--adapters", *sources, "--merger", "della", "--density", "0.5", "--out",
                       merged]).exit_code == 0
    result = invoke_cli(["merge", "--config", merged / "loramerge.yaml", "--merger", "ta", "--out", tmp_path / "t"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: --density does not apply to method ta (--density comes from the recipe "
                                     f"{merged / 'loramerge.yaml'})")
    typed = invoke_cli(["merge", "--adapters", *sources, "--merger", "ta", "--density", "0.5", "--out", tmp_path / "u"])
    assert typed.stderr.strip() == "error: --density does not apply to method ta"


def test_saved_safetensors_get_the_usual_permissions(tmp_path):
    """safetensors creates its file 0600: an NSC run dir's state could be read by no one else (every other file of
    the run dir is 0644), so another user of a shared run dir could not resume it."""
    import os

    import torch

    from loramerge_cli import atomic

    umask = os.umask(0o022)
    try:
        with atomic.replacing(tmp_path / "state.safetensors") as temporary:
            atomic.save_safetensors({"a": torch.zeros(2)}, temporary)
    finally:
        os.umask(umask)
    assert (tmp_path / "state.safetensors").stat().st_mode & 0o777 == 0o644


def test_an_interrupted_eval_says_its_run_dir_keeps_the_scores(tmp_path):
    """After Ctrl-C, eval said "interrupted; nothing was written" while its --run-dir held the scores so far."""
    from loramerge_cli import interrupts
    from loramerge_cli.evaluation.cache import ScoreCache

    interrupts.reset()
    try:
        ScoreCache(tmp_path / "run").put({"key": 0.5})
        assert interrupts.message() == (f"interrupted; {tmp_path / 'run' / 'scores.json'} keeps the scores computed so "
                                        "far: the same command reuses them")
        interrupts.reset()
        interrupts.set_hint("resume with: loramerge search-mask --run-dir r --resume", resumable=True)
        ScoreCache(tmp_path / "search").put({"other": 0.25})  # a search's own line stays
        assert interrupts.message() == "interrupted; resume with: loramerge search-mask --run-dir r --resume"
    finally:
        interrupts.reset()


def test_nsc_that_diverges_says_so(text_setting, tmp_path):
    """Coefficients blown up by `--lr 1000 --init 1000` zeroed every activation at a target: the error said "a batch
    has no non-padding token at a targeted module", which the inputs did have."""
    from factories import invoke_cli

    result = invoke_cli(["search-mask", "--adapters", *[f"{n}={f}" for n, f in text_setting.adapters.items()],
                         "--tasks", text_setting.tasks_file, "--strategy", "nsc", "--steps", "10", "--lr", "1000",
                         "--init", "1000", "--threads", "1", "--out", tmp_path / "t.json"])
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1].endswith("the training diverged; give a smaller --lr or --init"), \
        result.stderr


def test_counts_past_any_real_run_are_refused():
    """`--generations 99999999999999999999999999` (in a recipe or typed) was accepted: the search ran until killed."""
    from loramerge_cli.errors import UsageError
    from loramerge_cli.search.enmp_settings import EnmpSettings
    from loramerge_cli.search.nsc_settings import NscSettings

    with pytest.raises(UsageError, match=r"--generations must be at most 1000000 \(got 10{26}\)"):
        EnmpSettings(generations=10**26).check()
    with pytest.raises(UsageError, match="--popsize must be at most 100000"):
        EnmpSettings(popsize=10**6).check()
    with pytest.raises(UsageError, match="--steps must be at most 10000000"):
        NscSettings(steps=10**23).check()
    EnmpSettings(generations=1_000_000, popsize=100_000).check()


def test_a_typed_lambda_is_recorded_as_a_number(sources, tmp_path):
    """A λ typed on the command line was written `lambda: '0.3'` (text), a tuned one `lambda: 1.6`: a rebuild's
    recipe differed from the original's."""
    from factories import invoke_cli

    assert invoke_cli(["merge", "--adapters", *sources, "--lambda", "0.3", "--out", tmp_path / "a"]).exit_code == 0
    assert "\nlambda: 0.3\n" in (tmp_path / "a" / "loramerge.yaml").read_text()
    assert invoke_cli(["merge", "--config", tmp_path / "a" / "loramerge.yaml", "--out", tmp_path / "b"]).exit_code == 0
    assert (tmp_path / "a" / "loramerge.yaml").read_bytes() == (tmp_path / "b" / "loramerge.yaml").read_bytes()


def test_the_card_snippet_loads_the_base_at_its_revision():
    """Where the card's code loads the base itself (no AutoPeftModel class for the task type), it named no revision:
    the snippet loaded the default branch, not the base the configs' `revision` names."""
    from loramerge_cli.adapters.card import _use_snippet

    code = "\n".join(_use_snippet(None, "org/vit", "me/merged", None, False, model_class="AutoModel",
                                  base_revision="a" * 40))
    assert f"base = AutoModel.from_pretrained('org/vit', revision='{'a' * 40}')" in code
    assert "from_pretrained('org/vit')" in "\n".join(_use_snippet(None, "org/vit", "me/merged", None, False,
                                                                 model_class="AutoModel"))


def test_a_search_resume_refuses_a_hub_base_whose_branch_moved(text_setting, hub_base):
    """A search's resume hashed a local base's files but none of a Hub base's: a run resumed after `main` moved
    scored its later tables on another model, mixed with the earlier ones."""
    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.outputs import read_inputs
    from loramerge_cli.search.rundir import check_inputs, normal_path

    adapters = [f"{n}={f}" for n, f in text_setting.adapters.items()]

    def digests():
        import hashlib

        return {normal_path(path): hashlib.sha256(path.read_bytes()).hexdigest()
                for path in read_inputs(adapters, text_setting.tasks_file, "org/base")[0]}

    saved = digests()
    assert any("models--org--base" in path for path in saved)
    check_inputs(saved, digests())
    (hub_base / "refs" / "main").write_text("b" * 40)
    with pytest.raises(LoramergeError, match=f"the Hub repository org/base resolves to other files .a branch or tag "
                                             f"moved; the run read commit {'a' * 40}."):
        check_inputs(saved, digests())
    older = {path: digest for path, digest in saved.items() if "models--org--base" not in path}
    check_inputs(older, digests())  # a run saved before Hub bases were recorded still resumes


def _hub_adapters(text_setting, root: Path, revisions: dict) -> list[str]:
    """Copies of the text setting's adapters whose configs name `org/base` at the given revision each."""
    import json
    import shutil

    sources = []
    for name, folder in text_setting.adapters.items():
        copy = root / "adapters" / name
        shutil.copytree(folder, copy)
        config = json.loads((copy / "adapter_config.json").read_text())
        config.update(base_model_name_or_path="org/base", revision=revisions.get(name))
        (copy / "adapter_config.json").write_text(json.dumps(config))
        sources.append(f"{name}={copy}")
    return sources


def _spec(text_setting, path: Path, base: str | None) -> Path:
    import yaml

    spec = yaml.safe_load(text_setting.tasks_file.read_text())
    spec.pop("base_model")
    if base:
        spec["base_model"] = base
    for task in spec["tasks"]:
        task["data"] = {split: str(text_setting.tasks_file.parent / file) for split, file in task["data"].items()}
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_spec_base_and_the_adapters_revision_agree(text_setting, hub_base, tmp_path):
    """A spec's `base_model: org/base@v2` was refused as another base than the adapters' `org/base` (at v2); a spec's
    `org/base` made the adapters' `revision: v2` read `main`; adapters of different revisions were scored on one."""
    import json

    from factories import invoke_cli

    sources = _hub_adapters(text_setting, tmp_path, dict.fromkeys(text_setting.adapters, "v2"))
    for base in (None, "org/base", "org/base@v2", "hf://org/base"):
        spec = _spec(text_setting, tmp_path / "tasks.yaml", base)
        result = invoke_cli(["eval", "--adapters", *sources, "--tasks", spec, "--threads", "1", "--val-limit", "4",
                             "--json"])
        assert result.exit_code == 0, (base, result.output)
        assert json.loads(result.stdout)["base_model"] == "org/base@" + "b" * 40, base
    spec = _spec(text_setting, tmp_path / "tasks.yaml", "org/base@main")
    result = invoke_cli(["eval", "--adapters", *sources, "--tasks", spec, "--threads", "1"])
    assert result.exit_code == 1 and "trained on (org/base at revision v2)" in result.stderr, result.stderr
    mixed = _hub_adapters(text_setting, tmp_path / "mixed", {"alpha": "main"} | {"beta": "v2", "gamma": "v2"})
    result = invoke_cli(["eval", "--adapters", *mixed, "--tasks", _spec(text_setting, tmp_path / "t2.yaml", None),
                         "--threads", "1"])
    assert result.exit_code == 1 and "different revisions of their base model" in result.stderr, result.stderr


def test_a_local_folder_named_like_a_pinned_hub_base_is_refused(text_setting, hub_base, tmp_path, monkeypatch):
    """With a folder `org/base` in the working folder, `--base org/base@v2` loaded that folder (transformers reads a
    local folder first and drops the revision) while the outputs recorded the Hub commit."""
    import shutil

    from factories import invoke_cli

    monkeypatch.chdir(tmp_path)
    shutil.copytree(text_setting.base, tmp_path / "org" / "base")
    result = invoke_cli(["eval", "--adapters", *[f"{n}={f}" for n, f in text_setting.adapters.items()], "--tasks",
                         text_setting.tasks_file, "--base", "hf://org/base@v2", "--threads", "1"])
    assert result.exit_code == 1
    assert "a folder org/base is here, which the model loaders would read instead" in result.stderr, result.stderr


def test_the_scripts_check_their_outputs_first_and_stop_on_ctrl_c_in_one_line(tmp_path, capsys):
    """The example and benchmark scripts wrote --json/--plot after a run of minutes (a missing folder or a .txt plot
    was then a traceback), and Ctrl-C printed a traceback of 55 to 94 lines."""
    import argparse

    from examples.arguments import output_file, plot_file, run_script

    with pytest.raises(argparse.ArgumentTypeError, match="no folder"):
        output_file(str(tmp_path / "missing" / "x.json"))
    with pytest.raises(argparse.ArgumentTypeError, match="give a file ending in .png"):
        plot_file(str(tmp_path / "plot.txt"))
    assert plot_file(str(tmp_path / "plot.png")) == tmp_path / "plot.png"

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stopped:
        run_script(interrupted)
    assert stopped.value.code == 130 and capsys.readouterr().err == "interrupted\n"


def test_build_tiny_never_writes_into_a_folder_it_did_not_build(tmp_path):
    """`build_tiny.py mine` replaced mine/base/config.json with a Llama config, without a word."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "build_tiny.py"
    spec = importlib.util.spec_from_file_location("build_tiny", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "mine" / "base").mkdir(parents=True)
    (tmp_path / "mine" / "base" / "config.json").write_text('{"mine": true}')
    with pytest.raises(SystemExit, match="is not a playground this script built"):
        module.build(tmp_path / "mine")
    assert (tmp_path / "mine" / "base" / "config.json").read_text() == '{"mine": true}'


def test_eval_of_a_merge_pinned_to_another_revision_warns(text_setting, hub_base, tmp_path):
    """`eval --base hf://org/base@main --merged m` refused m (made for `org/base`) as a merge of another base, and a
    merge whose config names `v2` was scored on `main` without a word."""
    import json

    from factories import invoke_cli

    sources = _hub_adapters(text_setting, tmp_path, dict.fromkeys(text_setting.adapters, "v2"))
    assert invoke_cli(["merge", "--adapters", *sources, "--out", tmp_path / "m"]).exit_code == 0
    spec = _spec(text_setting, tmp_path / "tasks.yaml", None)
    result = invoke_cli(["eval", "--adapters", *sources, "--tasks", spec, "--merged", tmp_path / "m", "--base",
                         "hf://org/base@main", "--threads", "1", "--val-limit", "4", "--json"])
    assert result.exit_code == 0, result.output
    warnings = json.loads(result.stdout)["warnings"]
    assert any("its config names revision v2 of org/base" in line and "a" * 40 in line for line in warnings), warnings
    result = invoke_cli(["eval", "--adapters", *sources, "--tasks", spec, "--merged", tmp_path / "m", "--threads", "1",
                         "--val-limit", "4", "--json"])
    assert result.exit_code == 0, result.output
    assert not any("its config names revision" in line for line in json.loads(result.stdout)["warnings"])


def test_a_legacy_one_word_hub_base_is_pinned_and_loads(text_setting, tmp_path, monkeypatch):
    """`--base tinybase` (a one-word Hub id, as `gpt2`) became `tinybase@<commit>`, which no loader read: eval,
    `--lambda auto` and the searches failed where they had worked."""
    import hashlib
    import json

    import huggingface_hub.constants as constants

    from factories import invoke_cli

    repo = tmp_path / "hf" / "hub" / "models--tinybase"
    snapshot = repo / "snapshots" / ("c" * 40)
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in text_setting.base.iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c" * 40)
    for name, value in (("HF_HOME", tmp_path / "hf"), ("HF_HUB_CACHE", tmp_path / "hf" / "hub")):
        monkeypatch.setenv(name, str(value))
        monkeypatch.setattr(constants, name, str(value))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    for base in ("tinybase", "tinybase@main", "hf://tinybase"):
        result = invoke_cli(["eval", "--adapters", *[f"{n}={f}" for n, f in text_setting.adapters.items()], "--tasks",
                             text_setting.tasks_file, "--base", base, "--threads", "1", "--val-limit", "4", "--json"])
        assert result.exit_code == 0, (base, result.output)
        assert json.loads(result.stdout)["base_model"] == "tinybase@" + "c" * 40


def test_a_search_table_records_the_hub_base_commit_it_read(text_setting, hub_base, tmp_path):
    """A search's table recorded `--base org/base@v2` as the command line gave it, or nothing, never the commit read
    (a local base's path is not recorded: a table names no absolute path)."""
    import json

    from factories import invoke_cli

    adapters = [f"{n}={f}" for n, f in text_setting.adapters.items()]
    for base, expected in (("org/base@v2", "org/base@" + "b" * 40), (str(text_setting.base), None)):
        out = tmp_path / f"{expected is None}.json"
        result = invoke_cli(["search-mask", "--adapters", *adapters, "--tasks", text_setting.tasks_file, "--base",
                             base, "--strategy", "greedy", "--budget", "2", "--val-limit", "4", "--threads", "1",
                             "--out", out])
        assert result.exit_code == 0, result.output
        assert json.loads(out.read_text())["provenance"].get("base_model") == expected
