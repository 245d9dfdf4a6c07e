"""Review of session 24 (the library API as a Python user): each test failed before its fix."""

import json
import os
from pathlib import Path

import pytest

from factories import write_task_folders


def _loaded(setting):
    from loramerge_cli import api

    return api.load_adapters([f"{name}={folder}" for name, folder in setting.adapters.items()])


def test_write_merged_adapter_keeps_the_tuning_record(text_setting, tmp_path):
    """api.write_merged_adapter of a λ-tuned merge wrote no `lambda_tuning` (api.write did): the card read as if
    λ had been given by hand."""
    from loramerge_cli import api
    from loramerge_cli.api import LambdaTuning, MergeConfig

    adapters = _loaded(text_setting)
    result = api.merge(adapters, MergeConfig(merger="ta"), tuning=LambdaTuning(text_setting.tasks_file, threads=1,
                                                                                val_limit=8))
    api.write_merged_adapter(result, adapters, tmp_path / "tuned")
    recorded = json.loads((tmp_path / "tuned" / "loramerge.json").read_text())
    assert recorded["lambda_tuning"]["best"] == result.provenance["lambda_tuning"]["best"]
    assert "lambda_tuning" in result.provenance


def test_write_adapters_output_can_be_replaced_with_force(tmp_path):
    """A folder api.write_adapters wrote without a table could not be replaced even with force=True. Its marker is
    hidden, so that `copies/*` names the adapters only (a table of ones as the marker broke that)."""
    from factories import invoke_cli

    from loramerge_cli import api
    from loramerge_cli.errors import LoramergeError

    folders = write_task_folders(tmp_path / "inputs", names=("a", "b"))
    adapters = api.load_adapters([f"{name}={folder}" for name, folder in folders.items()])
    api.write_adapters(adapters, tmp_path / "copies")
    api.write_adapters(adapters, tmp_path / "copies", force=True)
    shown = sorted(path for path in (tmp_path / "copies").iterdir() if not path.name.startswith("."))  # a shell's *
    assert [path.name for path in shown] == ["a", "b"]
    assert invoke_cli(["inspect", *shown]).exit_code == 0
    (tmp_path / "copies" / ".loramerge-adapters.json").unlink()  # then it may be a folder of one's own adapters
    with pytest.raises(LoramergeError, match="holds adapter folders but no mask.json"):
        api.write_adapters(adapters, tmp_path / "copies", force=True)
    again = api.load_adapters([f"{name}={tmp_path / 'copies' / name}" for name in ("a", "b")])
    for first, second in zip(adapters, again):
        for path, module in first.modules.items():
            assert (module.lora_B @ module.lora_A).allclose(second.modules[path].lora_B @ second.modules[path].lora_A)


def test_paths_are_taken_as_sources(text_setting, tmp_path):
    """pathlib.Path adapters in plan_eval and SearchRequest failed with AttributeError."""
    from loramerge_cli import api
    from loramerge_cli.api import EvalSettings, MergeConfig

    experts = [Path(folder) for folder in text_setting.adapters.values()]
    plan = api.plan_eval(text_setting.tasks_file, experts, settings=EvalSettings(threads=1, val_limit=4))
    assert plan.experts == [str(folder) for folder in experts]
    request = api.SearchRequest(adapters=experts, merge=MergeConfig(), tasks=text_setting.tasks_file,
                                eval=EvalSettings(threads=1, val_limit=4), strategy="greedy", budget=2)
    assert api.plan_search(request).request.adapters == [str(folder) for folder in experts]
    request = api.SearchRequest(adapters=experts, merge=MergeConfig(), tasks=text_setting.tasks_file,
                                eval=EvalSettings(threads=1, val_limit=4), strategy="greedy", budget=2,
                                base=Path(text_setting.base), run_dir=str(tmp_path / "run"))
    planned = api.plan_search(request)  # (base=Path(...) was a raw TypeError reading the run's settings)
    assert planned.request.base == str(text_setting.base) and planned.request.run_dir == tmp_path / "run"


def test_numpy_numbers_are_taken_as_python_ones(tmp_path):
    """np.float32 energy passed the check and failed writing JSON (raw TypeError); np.float32 density/λ and
    np.int64 seeds were refused, the seed with a message saying the value was out of range."""
    np = pytest.importorskip("numpy")
    from loramerge_cli import api
    from loramerge_cli.api import EnmpSettings, MergeConfig

    folders = write_task_folders(tmp_path / "inputs", names=("a", "b"))
    adapters = api.load_adapters([f"{name}={folder}" for name, folder in folders.items()])
    for given, plain in (
        (MergeConfig(merger="ties", energy=np.float32(0.99), density=np.float32(0.5), lam=np.float64(0.5),
                     weights=[np.float32(1.0), np.float32(0.5)]),
         MergeConfig(merger="ties", energy=float(np.float32(0.99)), density=0.5, lam=0.5, weights=[1.0, 0.5])),
        (MergeConfig(merger="dare_ties", seed=np.int64(3), params={"drop_rate": np.float32(0.25)}),
         MergeConfig(merger="dare_ties", seed=3, drop_rate=0.25)),
    ):
        assert given == plain
        api.write_merged_adapter(api.merge(adapters, given), adapters, tmp_path / "np", force=True)
        api.write_merged_adapter(api.merge(adapters, plain), adapters, tmp_path / "plain", force=True)
        assert (tmp_path / "np" / "adapter_model.safetensors").read_bytes() == \
            (tmp_path / "plain" / "adapter_model.safetensors").read_bytes()
    settings = EnmpSettings(seed=np.int64(7), popsize=np.int32(4), max_prune=np.float32(0.5))
    settings.check()
    assert settings.seed == 7 and type(settings.popsize) is int
    assert MergeConfig(lam=np.longdouble(0.5)).lam == 0.5 and type(MergeConfig(lam=np.longdouble(0.5)).lam) is float
    assert api.parse_indices(list(np.argsort(np.array([3, 1, 2]))[:2])) == [1, 2]
    request = api.SearchRequest(adapters=[str(folder) for folder in folders.values()], merge=MergeConfig(),
                                tasks="tasks.yaml", eval=api.EvalSettings(), budget=np.int64(2),
                                sparsity=np.float32(0.25), options={"redraws": np.int64(2)})
    assert (type(request.budget), type(request.sparsity), type(request.options["redraws"])) == (int, float, int)


def test_wrong_types_are_usage_errors(text_setting, tmp_path):
    """A dict task spec raised a raw TypeError; a list of indices one from json."""
    import yaml

    from loramerge_cli import api
    from loramerge_cli.errors import UsageError

    adapters = _loaded(text_setting)
    spec = yaml.safe_load(Path(text_setting.tasks_file).read_text())
    with pytest.raises(UsageError, match="by its file's path"):
        api.evaluate(spec, adapters)
    with pytest.raises(UsageError, match="by its file's path"):
        api.plan_eval(spec, [str(folder) for folder in text_setting.adapters.values()])
    assert api.parse_indices([1, 2]) == api.parse_indices("[1, 2]") == [1, 2]
    table = api.weight_table(adapters, indices=[0])
    assert table.weights[0][0] == 0.0 and sum(w for row in table.weights for w in row) == \
        len(table.tasks) * len(table.units) - 1
    for bad in ([-1], [True], 3, None):
        with pytest.raises(UsageError):
            api.parse_indices(bad)


def test_merge_refuses_an_output(tmp_path):
    """api.merge(..., out=...) wrote nothing and returned factors in the output dtype, without a word."""
    from loramerge_cli import api
    from loramerge_cli.errors import UsageError

    folders = write_task_folders(tmp_path / "inputs", names=("a", "b"))
    adapters = api.load_adapters([f"{name}={folder}" for name, folder in folders.items()])
    with pytest.raises(UsageError, match="writes nothing"):
        api.merge(adapters, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hf_prefix_error_does_not_speak_of_a_local_path(tmp_path, monkeypatch):
    """`hf://org/name` (the Hub only) missing from the cache said "no such local file or folder, and as a Hub id",
    as if a local path had been looked for."""
    import huggingface_hub.constants as constants

    from loramerge_cli.adapters.sources import resolve
    from loramerge_cli.errors import LoramergeError

    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LoramergeError) as hub_only:
        resolve("hf://org/name")
    assert str(hub_only.value).startswith("hf://org/name: not in the local Hugging Face cache"), hub_only.value
    with pytest.raises(LoramergeError, match="^org/name: no such local file or folder, and as a Hub id: not in"):
        resolve("org/name")


def _images(folder: Path, classes, count: int = 2, seed: int = 0) -> None:
    import torch
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    for class_name in classes:
        (folder / class_name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            pixels = (torch.rand(8, 8, 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / class_name / f"{index}.png")


def test_numbered_class_folders_whose_text_order_is_not_numeric_are_refused(tmp_path):
    """Folders 0 … 11 were numbered in text order (0, 1, 10, 11, 2, …) without a word, while the docs said folders
    named by their indices keep them; a head may have been trained on either order, so `labels` must say which."""
    from eval_fixtures import write_tasks_file

    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.evaluation.data import check_task_file

    names = [str(index) for index in range(12)]
    _images(tmp_path / "images", names, count=1)
    for extra in ({}, {"num_labels": 12}):
        spec = write_tasks_file(tmp_path / "tasks.yaml", {"model_type": "image-classification", "tasks": [
            {"name": "digits", "data": {"validation": "images"}, **extra}]})
        with pytest.raises(LoramergeError, match="order as text .0, 1, 10, 11, …. is not their order as numbers"):
            check_task_file(spec)
    spec = write_tasks_file(tmp_path / "tasks.yaml", {"model_type": "image-classification", "tasks": [
        {"name": "digits", "data": {"validation": "images"}, "labels": names}]})
    assert check_task_file(spec) is not None
    _images(tmp_path / "few", names[:10], count=1)  # 0 … 9: text and numbers agree
    spec = write_tasks_file(tmp_path / "tasks.yaml", {"model_type": "image-classification", "tasks": [
        {"name": "digits", "data": {"validation": "few"}}]})
    assert check_task_file(spec) is not None


@pytest.fixture(scope="module")
def vit_setting(tmp_path_factory):
    from eval_fixtures import build_vit_classifier, save_peft_adapter

    root = tmp_path_factory.mktemp("vit")
    base = build_vit_classifier(root / "base")
    adapter = save_peft_adapter(base, root / "shapes", ["q_proj", "v_proj"], "AutoModelForImageClassification", None,
                                seed=5, head_modules=["classifier"])
    return base, adapter


def _eval_images(vit_setting, root: Path, *flags):
    import subprocess
    import sys

    from eval_fixtures import write_tasks_file

    base, adapter = vit_setting
    spec = write_tasks_file(root / "tasks.yaml", {"base_model": str(base), "model_type": "image-classification",
                                                  "tasks": [{"name": "shapes", "data": {"validation": "images"}}]})
    return subprocess.run([sys.executable, "-m", "loramerge_cli", "eval", "--adapters", f"shapes={adapter}",
                           "--tasks", str(spec), "--threads", "1", *flags], capture_output=True, timeout=300,
                          check=False, cwd=root)


def test_image_files_with_non_utf8_names_are_read(vit_setting, tmp_path):
    """A file whose name is not UTF-8 anywhere in an image folder (a stray text file, a hidden file, an image)
    was an internal error (UnicodeEncodeError) while the split was fingerprinted."""
    _images(tmp_path / "images", ("circle", "square", "star"))
    folder = os.fsencode(tmp_path / "images" / "circle")
    with open(folder + b"/\xff.txt", "wb") as handle:
        handle.write(b"x")
    with open(folder + b"/.\xff.png", "wb") as handle:
        handle.write(b"not an image, hidden")
    with open(folder + b"/1.png", "rb") as source, open(folder + b"/\xff\xfe.png", "wb") as handle:
        handle.write(source.read())
    result = _eval_images(vit_setting, tmp_path, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["examples"] == {"shapes": 7}  # six images, and the one named in bytes


def test_a_corrupt_exif_block_prints_nothing_under_quiet(vit_setting, tmp_path):
    """PIL's "Corrupt EXIF data" warning reached stderr (twice, with its source line) under --quiet and --json."""
    from PIL import Image

    _images(tmp_path / "images", ("circle", "square", "star"))
    image = Image.open(tmp_path / "images" / "star" / "0.png").convert("RGB")
    image.save(tmp_path / "images" / "star" / "2.jpg", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff garbage")
    with pytest.warns(UserWarning, match="Corrupt EXIF"):  # (the file does make PIL warn)
        from PIL import ImageOps

        with Image.open(tmp_path / "images" / "star" / "2.jpg") as opened:
            ImageOps.exif_transpose(opened)
    result = _eval_images(vit_setting, tmp_path, "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stderr == b"", result.stderr


def _huge_alpha(folder: Path, alpha: float) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    config["lora_alpha"] = alpha
    config["alpha_pattern"] = {key: alpha for key in config.get("alpha_pattern") or {}}
    (folder / "adapter_config.json").write_text(json.dumps(config))


def test_inspect_of_a_huge_alpha_gives_numbers_not_nan(tmp_path, monkeypatch):
    """lora_alpha 1e160: the norms were NaN (bare NaN in --json), the heatmap an internal error, the scale a
    160-digit integer."""
    from factories import invoke_cli

    from loramerge_cli import api

    folders = write_task_folders(tmp_path / "inputs", names=("a", "b"))
    plain = {key: value for key, value in zip(
        ("a", "b"), api.norm_grid(api.load_adapters([str(folders["a"]), str(folders["b"])]))["values"][0])}
    _huge_alpha(folders["a"], 1e160)
    result = invoke_cli(["inspect", folders["a"], folders["b"], "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"{name} in --json"))
    first_unit = report["norms"]["values"][0]
    assert first_unit[1] == pytest.approx(plain["b"], rel=1e-12)  # (the plain adapter's norm, unchanged)
    alpha_before = 3.0  # write_task_folders' first adapter: rank 2, alpha 3
    assert first_unit[0] == pytest.approx(plain["a"] * 1e160 / alpha_before, rel=1e-9)
    assert all(len(scale) < 20 for scale in report["adapters"][0]["scales"])
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert invoke_cli(["inspect", folders["a"], folders["b"], "--heatmap"]).exit_code == 0
    _huge_alpha(folders["a"], 1.7e308)  # past float64: null, and the note says why
    report = json.loads(invoke_cli(["inspect", folders["a"], "--json"]).stdout,
                        parse_constant=lambda name: pytest.fail(f"{name} in --json"))
    assert report["norms"]["values"][0] == [None]
    assert any("norm ‖scale·B·A‖ is past a float64's range" in note for note in report["adapters"][0]["notes"])


def test_a_norm_is_inf_only_when_it_is():
    """module_norm multiplied the scale by B's largest entry before A's: 1e300 · 1e30 overflowed though the norm,
    with A's 1e-30, is about 1e300."""
    import torch

    from loramerge_cli.adapters.model import LoraModule
    from loramerge_cli.api import module_norm

    generator = torch.Generator().manual_seed(0)
    B, A = torch.randn(6, 2, generator=generator, dtype=torch.float64), torch.randn(2, 5, generator=generator,
                                                                                       dtype=torch.float64)
    plain = float(torch.linalg.matrix_norm(B @ A))
    module = LoraModule(path="m", lora_A=A * 1e-30, lora_B=B * 1e30, scale=1e300, alpha=2e300)
    assert module_norm(module) == pytest.approx(plain * 1e300, rel=1e-12)
    unscaled = LoraModule(path="m", lora_A=A, lora_B=B, scale=1.0, alpha=2.0)
    assert module_norm(unscaled) == pytest.approx(plain, rel=1e-12)


def test_inspect_shows_the_scale_and_rslora(tmp_path):
    """The table showed ranks and alphas only: an rsLoRA adapter (scale α/√r) looked like a plain one (α/r)."""
    from factories import invoke_cli

    folders = write_task_folders(tmp_path / "inputs", names=("a", "b"))
    config = json.loads((folders["b"] / "adapter_config.json").read_text())
    (folders["b"] / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    result = invoke_cli(["inspect", folders["a"], folders["b"]])
    assert result.exit_code == 0, result.stderr
    scales = next(line for line in result.stdout.splitlines() if "scales" in line)
    assert "(α/r)" in scales and "(rsLoRA: α/√r)" in scales, scales


def test_weights_read_by_their_bytes_and_unreadable_ones_said_so(tmp_path):
    """A folder whose path is not UTF-8 was "corrupt or truncated" (safetensors opens UTF-8 paths only); a weights
    file that cannot be read was "No such file or directory"; task names mended on the command line are usage
    errors (exit 2; `x y=` was 1)."""
    from factories import invoke_cli

    from loramerge_cli.adapters.peft_reader import read_tensors
    from loramerge_cli.errors import LoramergeError

    folders = write_task_folders(tmp_path / "inputs", names=("a", "b"))
    odd = os.fsdecode(os.fsencode(tmp_path) + b"/a\xff")
    os.rename(folders["a"], odd)
    result = invoke_cli(["inspect", f"a={odd}", folders["b"], "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["adapters"][0]["modules"] > 0
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(LoramergeError, match=r"dir.safetensors: cannot read \(Is a directory\)"):
        read_tensors(tmp_path / "dir.safetensors")
    if os.geteuid() != 0:  # (root reads any file)
        weights = folders["b"] / "adapter_model.safetensors"
        weights.chmod(0)
        try:
            with pytest.raises(LoramergeError, match=r"cannot read \(Permission denied\)"):
                read_tensors(weights)
        finally:
            weights.chmod(0o644)
    for args in ([f"x y={folders['b']}"], [str(folders["b"]), str(folders["b"])]):
        assert invoke_cli(["inspect", *args]).exit_code == 2


def test_every_safetensors_read_takes_a_path_that_is_not_utf8(tmp_path):
    """Only adapters' weights were read from a non-UTF-8 path; a head file was "not a readable .safetensors head
    file" and a run dir's saved state "saved by another search" (safetensors opens UTF-8 paths only)."""
    import torch

    from loramerge_cli.atomic import read_safetensors, safetensors_metadata, save_safetensors
    from loramerge_cli.evaluation.heads import read_head_file
    from loramerge_cli.search.state_io import state_run_id

    folder = Path(os.fsdecode(os.fsencode(tmp_path) + b"/run\xff"))
    folder.mkdir()
    save_safetensors({"score.weight": torch.ones(2, 3)}, folder / "head.safetensors", {"run_id": "abc"})
    assert torch.equal(read_safetensors(folder / "head.safetensors")["score.weight"], torch.ones(2, 3))
    assert safetensors_metadata(folder / "head.safetensors") == {"run_id": "abc"}
    assert torch.equal(read_head_file(folder / "head.safetensors")["score.weight"], torch.ones(2, 3))
    assert state_run_id(folder / "head.safetensors") == "abc"
    save_safetensors({"x": torch.zeros(1)}, tmp_path / "plain.safetensors", {"run_id": "def"})
    assert safetensors_metadata(tmp_path / "plain.safetensors") == {"run_id": "def"}


def test_a_task_s_length_normalize_wins_over_the_flag(tmp_path):
    """`--length-normalize` overrode a task's explicit `length_normalize: false` without a word, and the report did
    not say which was used."""
    import torch
    from eval_fixtures import build_gpt2_lm, save_peft_adapter, write_jsonl, write_tasks_file

    from loramerge_cli.adapters.peft_reader import load_adapters
    from loramerge_cli.evaluation.engine import EvalSettings, Evaluator, adapter_deltas
    from loramerge_cli.evaluation.report import eval_report
    from loramerge_cli.evaluation.specs import load_task_file

    base = build_gpt2_lm(tmp_path / "gpt2")
    adapter = save_peft_adapter(base, tmp_path / "a", ["c_attn"], "GPT2LMHeadModel", "CAUSAL_LM", seed=1,
                                fan_in_fan_out=True)
    rows = [{"q": f"w{index} w2", "answer": index % 2} for index in range(4)]
    data = str(write_jsonl(tmp_path / "v.jsonl", rows))
    task = {"name": "a", "data": {"validation": data}, "prompt": "{q}", "choices": [" w1", " w2 w3"],
            "label": "answer"}
    scores = {}
    for given in (None, False, True):
        spec = write_tasks_file(tmp_path / "tasks.yaml", {"base_model": str(base), "model_type": "causal-lm", "tasks": [
            {**task, **({} if given is None else {"length_normalize": given})}]})
        for flag in (False, True):
            engine = Evaluator(load_task_file(spec), load_adapters([f"a={adapter}"]),
                               EvalSettings(threads=1, length_normalize=flag))
            with engine.apply(adapter_deltas(engine.experts["a"])):
                scores[given, flag] = engine.scores("a")
    assert torch.equal(scores[False, True], scores[None, False])
    assert torch.equal(scores[True, False], scores[None, True])
    assert not torch.equal(scores[None, False], scores[None, True])
    spec = write_tasks_file(tmp_path / "tasks.yaml", {"base_model": str(base), "model_type": "causal-lm", "tasks": [
        {**task, "length_normalize": False}]})
    report = eval_report(spec, load_adapters([f"a={adapter}"]), [], EvalSettings(threads=1, length_normalize=True))
    assert report["length_normalize"] == {"a": False}
    assert any("--length-normalize does not apply to a" in warning for warning in report["warnings"])
    fingerprints = {}  # the score cache's key follows what is scored (the flag alone would reuse stale scores)
    for given in (None, False):
        spec = write_tasks_file(tmp_path / "tasks.yaml", {"base_model": str(base), "model_type": "causal-lm", "tasks": [
            {**task, **({} if given is None else {"length_normalize": given})}]})
        for flag in (False, True):
            engine = Evaluator(load_task_file(spec), load_adapters([f"a={adapter}"]),
                               EvalSettings(threads=1, length_normalize=flag))
            fingerprints[given, flag] = engine.fingerprint("a")
    assert fingerprints[False, True] != fingerprints[None, True]


def test_choice_names_mask_and_label_cells_read_as_numbers_only_when_they_are(tmp_path):
    """A causal-LM task's masked_labels could not name a choice (its label column could); a CSV label `1_0` was read
    as 10 (Python's float takes underscores)."""
    from eval_fixtures import write_tasks_file

    from loramerge_cli.evaluation.batches import model_inputs_of
    from loramerge_cli.evaluation.data import _label_from_text
    from loramerge_cli.evaluation.specs import load_task_file
    from loramerge_cli.errors import LoramergeError

    spec = write_tasks_file(tmp_path / "tasks.yaml", {"model_type": "causal-lm", "tasks": [
        {"name": "a", "data": {"validation": "v.jsonl"}, "prompt": "{q}", "choices": [" yes", " no", " maybe"],
         "masked_labels": [" maybe"]}]})
    assert load_task_file(spec).tasks[0].masked_labels == [2]
    assert [_label_from_text(cell) for cell in ("2", "2.0", " 3 ", "True", "1_0", "inf", "nan", "٣")] == \
        [2, 2, 3, 1, "1_0", "inf", "nan", "٣"]
    with pytest.raises(LoramergeError, match="task t: the model refuses its inputs: index out of range in self"):
        with model_inputs_of("t"):  # an embedding lookup past its table (a BERT's token types)
            raise IndexError("index out of range in self")


def test_prompt_fields_name_columns_as_written(tmp_path):
    """`{my-q}` over rows with a `my-q` column was refused as naming no column (str.format reads it as the key
    `my-q`); lookups (`{q.upper}`, `{q[0]}`) and positions stay refused, and every other prompt reads as before."""
    from eval_fixtures import write_jsonl, write_tasks_file

    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.evaluation.data import load_examples
    from loramerge_cli.evaluation.specs import load_task_file

    write_jsonl(tmp_path / "v.jsonl", [{"my-q": "w1", "n": 5, "w": 4, "answer": 0}])

    def filled(prompt):
        spec = write_tasks_file(tmp_path / "tasks.yaml", {"model_type": "causal-lm", "tasks": [
            {"name": "a", "data": {"validation": "v.jsonl"}, "prompt": prompt, "choices": [" yes", " no"],
             "label": "answer"}]})
        task_file = load_task_file(spec)
        return load_examples(task_file, task_file.tasks[0], "validation").inputs[0]

    assert filled("{my-q} {n} {{q}} {my-q:>{w}}|{n:5}|") == "w1 5 {q}   w1|5    |"  # (numbers as text, as before)
    for prompt in ("{my-q.upper}", "{n[0]}", "{0}", "{}"):
        with pytest.raises(LoramergeError, match="bad format string"):
            filled(prompt)


def test_images_a_listing_names_are_inputs_and_their_content_keys_the_scores(tmp_path):
    """A search's resume hashed a listing file but not the images it names (changed images were scored with the
    old ones' results); a score cache keyed listed images by size and mtime only, so an edit that kept both
    (`cp -p`, `touch -r`) served stale scores. They are keyed by content now, as a folder split's images are."""
    from eval_fixtures import write_jsonl, write_tasks_file

    from loramerge_cli.evaluation.data import file_version, load_examples
    from loramerge_cli.evaluation.specs import load_task_file
    from loramerge_cli.outputs import read_inputs

    _images(tmp_path / "images", ("circle", "square"))
    rows = [{"image": f"images/{name}/{index}.png", "label": label}
            for label, name in enumerate(("circle", "square")) for index in range(2)]
    write_jsonl(tmp_path / "list.jsonl", rows)
    spec = write_tasks_file(tmp_path / "tasks.yaml", {"model_type": "image-classification", "tasks": [
        {"name": "shapes", "data": {"validation": "list.jsonl"}, "label": "label", "num_labels": 2}]})
    files, _ = read_inputs([], spec, None)
    assert {tmp_path / row["image"] for row in rows} <= set(files)
    task_file = load_task_file(spec)
    before = load_examples(task_file, task_file.tasks[0], "validation").fingerprint
    image, other = tmp_path / rows[0]["image"], tmp_path / rows[1]["image"]
    version, stat = file_version(image), image.stat()
    image.write_bytes(image.read_bytes())  # (the same bytes: the same scores)
    assert file_version(image) != version  # (the decode check's key sees the write)
    assert load_examples(task_file, task_file.tasks[0], "validation").fingerprint == before
    image.write_bytes(other.read_bytes())  # another image, with the old one's mtime
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert load_examples(task_file, task_file.tasks[0], "validation").fingerprint != before
    from loramerge_cli.merging.config import MergeConfig
    from loramerge_cli.search.plan import SearchRequest
    from loramerge_cli.search.rundir import input_paths, listed_inputs

    request = SearchRequest(adapters=[], merge=MergeConfig(), tasks=spec, eval=None)
    images = {str((tmp_path / row["image"]).resolve()) for row in rows}
    assert listed_inputs(request) == images and images <= {str(path.resolve()) for path in input_paths(request)}


def test_a_resume_refuses_a_changed_listed_image_and_takes_an_older_run(tmp_path):
    """The resume check: a changed listed image is refused (it was not recorded); a run saved before the images
    were recorded (its inputs hold the listing only) still resumes, its listing unchanged."""
    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.search.rundir import check_inputs

    saved = {"/d/list.jsonl": "a", "/d/images/0.png": "b"}
    check_inputs(saved, dict(saved), {"/d/images/0.png"})
    with pytest.raises(LoramergeError, match="0.png changed"):
        check_inputs(saved, {**saved, "/d/images/0.png": "c"}, {"/d/images/0.png"})
    check_inputs({"/d/list.jsonl": "a"}, dict(saved), {"/d/images/0.png"})  # an older run's record
    with pytest.raises(LoramergeError, match="is a new input"):
        check_inputs({"/d/list.jsonl": "a"}, {**saved, "/d/other.jsonl": "d"}, {"/d/images/0.png"})


def test_random_search_stops_once_every_mask_of_its_size_is_scored():
    """With a budget above the number of masks of its size, random search drew repeats until 100·budget draws
    (18,750 trajectory rounds for 8 tables), and numbered its rounds attempts // 16 (0, 1, 1, 1, …)."""
    import math

    from loramerge_cli.search.baselines import random_search

    scored, rounds = [], []

    def fitness(candidates):
        scored.extend(candidates)
        return [float(sum(pruned)) for pruned, _ in candidates]

    ledger = random_search(fitness, flat_size=6, pruned_count=2, budget=1000, seed=1, on_round=rounds.append)
    assert len(scored) == len(set(scored)) == math.comb(6, 2)
    assert [record["round"] for record in rounds] == list(range(1, len(rounds) + 1)) and len(rounds) < 10
    assert ledger.best().pruned == (4, 5)


def test_table_errors_do_not_repeat_a_huge_input():
    """A table of 10⁵ tasks, or an --indices of 10⁵ brackets, was repeated back whole in its one-line error."""
    from loramerge_cli.errors import UsageError
    from loramerge_cli.masks import FORMAT, _structure_problem, parse_indices

    with pytest.raises(UsageError) as refused:
        parse_indices("[" * 100_000)
    assert len(str(refused.value)) < 400 and "100,002 characters" in str(refused.value)
    units = [f"model.layers.{index}" for index in range(20_000)] + ["model.layers.0"]
    problem = _structure_problem({"format": FORMAT, "tasks": ["a"], "units": units,
                            "weights": [[1.0] * len(units)]})
    assert problem is not None and len(problem) < 400, problem[:500]
