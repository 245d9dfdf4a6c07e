"""The bundled example's builder, at its tiny scale: what it writes loads with plain transformers/PEFT and
with loramerge's own readers, the data matches the rules, and builds are cached and deterministic."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:  # `examples` is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPOSITORY))

from examples.bundled import build, check, image, language, text  # noqa: E402

TEXT_TASKS = list(language.TASKS)
IMAGE_TASKS = list(image.TRANSFORMS)


BUILD_LOG: list[str] = []


@pytest.fixture(scope="module")
def bundled(tmp_path_factory) -> Path:
    out = (tmp_path_factory.mktemp("bundled") / "example").resolve()  # as the builder writes base paths
    build.build(out, build.TINY, log=BUILD_LOG.append)
    return out


def test_the_build_says_each_stage_as_it_starts(bundled):
    """The full build is minutes of training; it said two lines in all (a log looked hung for 13 minutes)."""
    said = "\n".join(BUILD_LOG)
    for name, tasks in (("text", TEXT_TASKS), ("image", IMAGE_TASKS)):
        assert f"{name}: pretraining the base model" in said
        for index, task in enumerate(tasks):
            assert f"{name}: training adapter {task} ({index + 1} of {len(tasks)})" in said, said


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tasks_yaml_parses_with_loramerge_and_points_at_the_files(bundled):
    from loramerge_cli.evaluation.specs import load_task_file

    for setting, model_type, names in (("text", "sequence-classification", TEXT_TASKS),
                                       ("image", "image-classification", IMAGE_TASKS)):
        spec = load_task_file(bundled / setting / "tasks.yaml")
        assert spec.model_type == model_type
        assert spec.names == names
        assert Path(spec.base_model) == bundled / setting / "base"
        for task in spec.tasks:
            assert (bundled / setting / "adapters" / task.name / "adapter_model.safetensors").is_file()
            assert set(task.data) == {"validation", "test"}
            assert all(Path(path).exists() for path in task.data.values())
            assert task.head == "from-adapter"


def test_text_data_follows_the_rules_and_is_balanced(bundled):
    kind_of = {word: kind for kind, group in enumerate(language.vocabulary()) for word in group}
    for name, rule in language.TASKS.items():
        rows = _rows(bundled / "text" / "data" / name / "validation.jsonl")
        assert len(rows) == build.TINY.text.validation_examples
        assert all(rule(row["text"].split(), kind_of) == row["label"] for row in rows)
        counts = torch.bincount(torch.tensor([row["label"] for row in rows]), minlength=language.KIND_COUNT)
        assert counts.tolist() == [len(rows) // language.KIND_COUNT] * language.KIND_COUNT
    validation = {row["text"] for row in _rows(bundled / "text" / "data" / "first_kind" / "validation.jsonl")}
    test = {row["text"] for row in _rows(bundled / "text" / "data" / "first_kind" / "test.jsonl")}
    assert not validation & test


def test_rules_on_a_hand_written_sentence():
    words = language.vocabulary()
    kind_of = {word: kind for kind, group in enumerate(words) for word in group}
    tokens = [words[2][0], words[1][0], language.MARKER, words[3][0], words[1][1], words[0][0]]
    assert [rule(tokens, kind_of) for rule in language.TASKS.values()] == [2, 0, 3, 1]
    assert [rule(tokens, kind_of) for rule in language.PRETRAINING_RULES] == [1, 1, 0]


def test_text_adapters_load_with_peft_and_match_the_manual_update(bundled):
    """PeftModel on the base gives the same logits as W0 + s·B@A with the adapter's head swapped in."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = str(bundled / "text" / "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = _rows(bundled / "text" / "data" / "after_marker" / "validation.jsonl")
    inputs = tokenizer([row["text"] for row in rows], padding=True, return_tensors="pt", return_token_type_ids=False)
    assert inputs["input_ids"][0, 0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in inputs["input_ids"]
    alphas_differ = False
    for name in TEXT_TASKS:
        folder = bundled / "text" / "adapters" / name
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == base
        assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
        assert "score" in config["modules_to_save"] and config["task_type"] == "SEQ_CLS"
        alphas_differ |= config["lora_alpha"] != config["r"]
        with torch.no_grad():
            model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=language.KIND_COUNT)
            peft_logits = PeftModel.from_pretrained(model, str(folder)).eval()(**inputs).logits
            manual = AutoModelForSequenceClassification.from_pretrained(base, num_labels=language.KIND_COUNT).eval()
            deltas, head = check.lora_updates(folder)
            parameters = dict(manual.named_parameters())
            assert len(deltas) == 4 * build.TINY.text.layers and set(head) == {"score.weight"}
            for key, tensor in head.items():
                parameters[key].copy_(tensor)
            head_only = manual(**inputs).logits
            for path, delta in deltas.items():
                parameters[path + ".weight"].add_(delta.float())
            assert not torch.allclose(head_only, peft_logits, atol=1e-3)  # the update matters
            assert peft_logits.shape == (len(rows), language.KIND_COUNT)
            torch.testing.assert_close(manual(**inputs).logits, peft_logits, rtol=1e-4, atol=1e-5)
    assert alphas_differ


def test_image_adapters_and_png_trees_load(bundled):
    from peft import PeftModel
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    base = str(bundled / "image" / "base")
    processor = AutoImageProcessor.from_pretrained(base)
    for name in IMAGE_TASKS:
        tree = bundled / "image" / "data" / name / "validation"
        files = sorted(tree.glob("*/*.png"))
        assert len(files) == build.TINY.image.validation_examples
        assert {path.parent.name for path in files} <= set(image.CLASS_NAMES)
        pixels = processor([Image.open(path).convert("RGB") for path in files], return_tensors="pt")["pixel_values"]
        assert pixels.shape == (len(files), 3, 8, 8)
        model = PeftModel.from_pretrained(AutoModelForImageClassification.from_pretrained(base),
                                          str(bundled / "image" / "adapters" / name)).eval()
        with torch.no_grad():
            assert model(pixel_values=pixels).logits.shape == (len(files), len(image.CLASS_NAMES))


def test_transforms_are_what_their_names_say():
    digit = torch.arange(64, dtype=torch.uint8).reshape(1, 8, 8).numpy()
    assert image.TRANSFORMS["mirrored"](digit)[0, 0, 0] == 7
    assert image.TRANSFORMS["rotated"](digit)[0, 0, 0] == 7  # counter-clockwise: the top row's right end goes up-left
    assert image.TRANSFORMS["inverted"](digit)[0, 0, 1] == 254


def test_loramerge_reads_every_adapter_with_its_head(bundled):
    from loramerge_cli.adapters.peft_reader import load_adapters

    adapters = load_adapters([str(bundled / "text" / "adapters" / name) for name in TEXT_TASKS])
    assert [adapter.name for adapter in adapters] == TEXT_TASKS
    assert all(list(adapter.heads) == ["score.weight"] for adapter in adapters)
    assert {module.rank for module in adapters[2].modules.values()} == {text.LORA_SHAPES["after_marker"][0]}


def test_build_is_cached_and_the_stamp_follows_the_settings(bundled):
    before = (bundled / "build.json").stat().st_mtime_ns
    record = build.build(bundled, build.TINY)
    assert (bundled / "build.json").stat().st_mtime_ns == before
    assert record["stamp"] == build.stamp(build.TINY) != build.stamp(build.FULL)


def test_refuses_to_clear_a_folder_it_did_not_build(tmp_path):
    from loramerge_cli.errors import LoramergeError

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(LoramergeError, match="not a bundled-example build"):
        build.build(tmp_path, build.TINY)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_text_build_is_deterministic(bundled, tmp_path):
    from examples.bundled import common

    with common.deterministic():
        text.build(tmp_path / "text", build.TINY.text)
    for name in TEXT_TASKS:
        relative = Path("adapters") / name / "adapter_model.safetensors"
        assert (tmp_path / "text" / relative).read_bytes() == (bundled / "text" / relative).read_bytes()


def test_nsc_premise_measures_each_row_and_reads_a_coefficient_table(bundled, tmp_path):
    from examples import nsc_premise
    from loramerge_cli.adapters.peft_reader import load_adapters
    from loramerge_cli.masks import WeightTable
    from loramerge_cli.merging.merge import module_paths

    setting = bundled / "text"
    adapters = load_adapters([f"{t}={setting / 'adapters' / t}" for t in language.TASKS])
    paths = module_paths(adapters)
    table = WeightTable(tasks=list(language.TASKS), units=paths, weights=[[0.4] * len(paths) for _ in adapters],
                        unit="module", scale=1.0)
    table.save(tmp_path / "coeffs.json")
    result = nsc_premise.measure(setting, None, tmp_path / "coeffs.json", val_limit=8)
    assert result["targets"] == [f"model.layers.{build.TINY.text.layers - 1}.self_attn.v_proj"]
    rows = list(result["rows"].values())
    assert len(rows) == 5 and all(len(row) == len(language.TASKS) for row in rows)
    assert all(0.0 < value <= 1.0 for row in rows for value in row)
    assert rows[4] == rows[2]  # a table of 0.4 everywhere is ta at λ = 0.4, read through the table
    assert rows[0] != rows[2]  # the coefficients reach the measured inputs
    at_o_proj = nsc_premise.measure(setting, None, None, val_limit=8, target_modules=["o_proj"])
    assert at_o_proj["targets"] == [f"model.layers.{build.TINY.text.layers - 1}.self_attn.o_proj"]
    assert list(at_o_proj["rows"].values())[0] != rows[0]  # measured at the other module


def test_block_replay_is_exact_on_the_vit(bundled):
    from loramerge_cli.adapters.peft_reader import load_adapters
    from loramerge_cli.evaluation.cache import ScoreCache, expert_scores
    from loramerge_cli.evaluation.engine import EvalSettings, Evaluator
    from loramerge_cli.evaluation.specs import load_task_file
    from loramerge_cli.masks import ones_table
    from loramerge_cli.merging.merge import MergeConfig, resolve_config
    from loramerge_cli.search.fitness import AccuracyFitness

    setting = bundled / "image"
    adapters = load_adapters([f"{t}={setting / 'adapters' / t}" for t in IMAGE_TASKS])
    engine = Evaluator(load_task_file(setting / "tasks.yaml"), adapters, EvalSettings(threads=1, batch_size=8))
    fitness = AccuracyFitness(adapters, resolve_config(MergeConfig(merger="ta"), len(adapters)), ones_table(adapters),
                              engine, expert_scores(engine, ScoreCache()))
    last_block = build.TINY.image.layers - 1
    for pruned in [(last_block * len(adapters),), (last_block * len(adapters) + 1, last_block * len(adapters) + 2)]:
        deltas = fitness.candidate_deltas(pruned, None)
        assert fitness.replay.first_changed(deltas) == last_block
        assert fitness.replay.evaluate(deltas) == engine.evaluate(deltas)
    assert fitness.replay.verified and fitness.replay.replayed_blocks == 2 * last_block


def test_nsc_table_scores_a_command_s_table_as_the_command_reports_it(bundled, tmp_path):
    from examples import nsc_table
    from examples.main_job import adapter_args
    from loramerge_cli.adapters.peft_reader import load_adapters

    setting = bundled / "text"
    tasks_file = setting / "tasks.yaml"
    arguments = adapter_args(setting, tasks_file)
    adapters = load_adapters(arguments)
    scorers = {split: nsc_table.Scorer(adapters, tasks_file, split, 1) for split in ("validation", "test")}
    rows = nsc_table.baseline_rows(scorers, len(adapters))
    assert [row["key"] for row in rows] == ["ta", "ta_0.4"]
    row = nsc_table.run_row("nsc", arguments, tasks_file, scorers, [1], 1, tmp_path, lambda message: None)
    [run] = row["runs"]
    assert run["seconds"] > 0 and set(run["test_per_task"]) == set(language.TASKS)
    # the same command with --report-test scores its table on the test split itself: the two must agree
    _, flags = nsc_table.ROWS["nsc"]
    nsc_table.run_command([*flags, "--report-test"], arguments, tasks_file, 1, 1, tmp_path / "reported.json")
    reported = json.loads((tmp_path / "reported.json").read_text())["provenance"]["test"]
    assert run["test"] == pytest.approx(reported["coefficients_mean_normalized_accuracy"], abs=1e-9)
    assert rows[0]["runs"][0]["test"] == pytest.approx(reported["ta_default_mean_normalized_accuracy"], abs=1e-9)
    rendered = nsc_table.render(rows + [row], "text", list(language.TASKS), [1], 1.0)
    assert rendered.row_count == 3
    assert nsc_table.row_flags("nsc_init_ta", 4)[-2:] == ["--init", "0.25"]  # ta's default λ, 1/T
    assert nsc_table.row_flags("nsc_init_ta", 3)[-1] == repr(1 / 3)


def test_subset_ranking_measures_the_search_s_own_fitness(bundled):
    import numpy as np

    from examples import subset_ranking
    from loramerge_cli.adapters.peft_reader import load_adapters
    from loramerge_cli.evaluation.cache import ScoreCache, expert_scores
    from loramerge_cli.evaluation.engine import EvalSettings, Evaluator
    from loramerge_cli.evaluation.specs import load_task_file
    from loramerge_cli.masks import ones_table
    from loramerge_cli.merging.merge import MergeConfig, resolve_config
    from loramerge_cli.search.fitness import AccuracyFitness

    setting = bundled / "text"
    adapters = load_adapters([f"{t}={setting / 'adapters' / t}" for t in TEXT_TASKS])
    engine = Evaluator(load_task_file(setting / "tasks.yaml"), adapters, EvalSettings(threads=1, batch_size=8))
    experts = expert_scores(engine, ScoreCache())
    fitness = AccuracyFitness(adapters, resolve_config(MergeConfig(merger="ta"), len(adapters)), ones_table(adapters),
                              engine, experts)
    reference = subset_ranking.example_outputs(engine, fitness.candidate_deltas((), None))
    for table in [(0,), (1, 2, 5)]:
        outputs = subset_ranking.example_outputs(engine, fitness.candidate_deltas(table, None))
        expected = fitness.score(table, None) - fitness.reference
        assert subset_ranking.subset_fitness(outputs, reference, experts, "accuracy") == pytest.approx(expected)
        every = {task: np.arange(len(values["accuracy"]))[::-1] for task, values in outputs.items()}
        assert subset_ranking.subset_fitness(outputs, reference, experts, "accuracy", every) == pytest.approx(expected)
        for values in outputs.values():
            assert np.all((values["probability"] > 0) & (values["probability"] <= 1))
            assert np.array_equal(values["accuracy"] == 1, values["margin"] > 0)  # right exactly when ahead
    groups = subset_ranking.table_groups({(unit,): float(-unit) for unit in range(20)}, 20)
    assert [len(tables) for tables in groups.values()] == [20, 40, 40]
    assert all(set(range(4)) <= set(table) for table in groups["best 4 singles + 2"])


def test_subset_ranking_counts_the_examples_a_table_changes():
    import numpy as np

    from examples import subset_ranking

    def outputs(right, margin=(0.0, 0.0, 0.0, 0.0)):
        return {"a": {"accuracy": np.array(right, float), "margin": np.array(margin)}}

    reference = outputs([1, 0, 1, 0], [0.1, -3.0, 2.0, -0.2])
    tables = {(0,): outputs([1, 1, 1, 0]), (1,): outputs([0, 0, 1, 1])}  # one change (+1); two (net 0)
    row = subset_ranking.changes("ta", tables, reference)
    assert (row["changed_per_table"], row["net_gain_per_table"], row["ever_changed"]) == (1.5, 0.5, 0.75)
    assert row["changes_near_boundary"] == pytest.approx(2 / 3)  # examples 0 and 3 have the smallest |margin|


@pytest.mark.parametrize("script, args", [("main_job", ["--json", "/nonexistent-folder/results.json"]),
                                          ("subset_ranking", ["--mergers", "nope"]),
                                          ("subset_ranking", ["--sizes", "abc"])])
def test_example_scripts_refuse_bad_arguments_before_any_work(script, args, capsys):
    import importlib

    module = importlib.import_module(f"examples.{script}")
    with pytest.raises(SystemExit) as stopped:
        module.main(args)
    assert stopped.value.code == 2 and "error:" in capsys.readouterr().err
