"""NSC (docs/algorithms.md, NSC): the null-space ratio (its worked example 1/√3), the differentiable side path
against the materialised merge, targets, training with resume, the entropy baseline and label-free ENMP."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from eval_fixtures import build_text_setting, build_vit_classifier, save_peft_adapter, write_tasks_file
from factories import invoke_cli

from loramerge_cli.errors import LoramergeError
from loramerge_cli.evaluation.engine import EvalSettings, Evaluator, merged_deltas
from loramerge_cli.evaluation.functional import InputRecorder, SidePath, freeze
from loramerge_cli.evaluation.specs import load_task_file
from loramerge_cli.masks import load_table
from loramerge_cli.merging.merge import MergeConfig, merge
from loramerge_cli.search.nsc import NscSettings, batch_indices, build_nsc_problem, train_step
from loramerge_cli.search.nsc_objectives import inverse_gram, null_space_ratio, prediction_entropy
from loramerge_cli.search.nsc_targets import resolve_targets
from loramerge_cli.search.runner import SearchRequest, run_search

F64 = torch.float64


def ratio(A, z) -> float:
    A, z = torch.as_tensor(A, dtype=F64), torch.as_tensor(z, dtype=F64)
    return float(null_space_ratio(z[None], A, inverse_gram(A))[0])


def reference_ratio(A, z, scale=1.0):
    """The reference code's formula (docs/differences.md): y from the *scaled* A, no clamp before the square root."""
    y = scale * (A @ z)
    gram_inverse = torch.linalg.inv(A @ A.T + 1e-8 * torch.eye(A.shape[0], dtype=A.dtype))
    return torch.sqrt(1 - (y @ gram_inverse @ y) / (z @ z + 1e-8))


# --- the ratio ---------------------------------------------------------------------------------------

def test_canonical_value_and_row_space_invariance():
    assert abs(ratio([[1, 0, 0], [0, 1, 0]], [1, 1, 1]) - 0.5773502691896258) < 1e-10  # 1/√3
    assert abs(ratio([[1, 1, 0], [0, 2, 0]], [1, 1, 1]) - 0.5773502691896258) < 1e-10


def test_row_space_gives_zero_and_orthogonal_gives_one():
    generator = torch.Generator().manual_seed(0)
    A = torch.randn(4, 12, generator=generator, dtype=F64)
    inside = A.T @ torch.randn(4, generator=generator, dtype=F64)
    assert ratio(A, inside) < 1e-7
    basis = torch.linalg.qr(A.T, mode="complete").Q  # columns 4.. span the orthogonal complement
    outside = basis[:, 4:] @ torch.randn(8, generator=generator, dtype=F64)
    assert abs(ratio(A, outside) - 1.0) < 1e-12
    mixing = torch.randn(4, 4, generator=generator, dtype=F64)
    z = torch.randn(12, generator=generator, dtype=F64)
    assert abs(ratio(mixing @ A, z) - ratio(A, z)) < 1e-9


def test_isotropic_input_and_agreement_with_the_quadratic_form():
    generator = torch.Generator().manual_seed(1)
    A = torch.randn(16, 64, generator=generator, dtype=F64)
    Z = torch.randn(4000, 64, generator=generator, dtype=F64)
    omega = null_space_ratio(Z, A, inverse_gram(A))
    assert abs(float((omega**2).mean()) - 0.75) < 0.01  # E[ω²] = 1 − r/d
    quadratic = (Z @ A.T) @ inverse_gram(A) * (Z @ A.T)
    closed_form = torch.sqrt(torch.clamp(1 - quadratic.sum(1) / (Z * Z).sum(1), min=0))
    assert torch.allclose(omega, closed_form, atol=1e-7)


def test_the_reference_goes_nan_with_alpha_not_r_and_ours_does_not():
    generator = torch.Generator().manual_seed(2)
    A = torch.randn(16, 64, generator=generator, dtype=F64)
    z = torch.randn(64, generator=generator, dtype=F64)
    assert math.isnan(float(reference_ratio(A, z, scale=3.0)))  # s = α/r = 3: s²·P > 1 (the reference code scales A)
    assert 0.8 < ratio(A, z) < 0.95
    assert abs(float(reference_ratio(A, z)) - ratio(A, z)) < 1e-6  # α = r: both agree


def test_entropy_of_uniform_and_masked_logits():
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, 50.0, 0.0]])
    entropy = prediction_entropy(logits)
    assert abs(float(entropy[0]) - math.log(3)) < 1e-6 and float(entropy[1]) < 1e-6
    masked = prediction_entropy(logits, [1])
    assert torch.allclose(masked, torch.tensor([math.log(2), math.log(2)]))


# --- the side path -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    return build_text_setting(tmp_path_factory.mktemp("nsc"))


def request(setting, **changes) -> SearchRequest:
    base = SearchRequest(
        adapters=setting.adapter_args(), merge=MergeConfig(merger="ta"), tasks=setting.tasks_file,
        eval=EvalSettings(threads=1, batch_size=8), strategy="nsc",
        nsc=NscSettings(steps=6, batch_size=8, lr=0.05, checkpoint_every=2),
    )
    if changes.get("strategy", "nsc") != "nsc":  # the label-free ENMP fitness reads no training setting
        changes.setdefault("nsc", NscSettings(batch_size=8, checkpoint_every=2))
    return replace(base, **changes)


@pytest.fixture(scope="module")
def problem(setting):
    return build_nsc_problem(request(setting))


def coefficient_rows(task_count, module_count, seed=5):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(task_count, module_count, generator=generator) * 1.5 - 0.25).tolist()


@pytest.mark.slow
def test_side_path_equals_the_materialised_merge(problem):
    """W0 x + Σ_k λ_k^j B̃_k^j (A_k^j x) = the ta merge of the λ table (scale 1) patched into the weights."""
    from loramerge_cli.masks import ones_table

    engine, adapters = problem.engine, problem.adapters
    side = SidePath(engine.modules, adapters, problem.paths, engine.device, engine.dtype)
    rows = coefficient_rows(len(adapters), len(problem.paths))
    with torch.no_grad():
        side.coefficients.copy_(torch.tensor(rows))
    table = replace(ones_table(adapters), unit="module", units=problem.paths, weights=rows, scale=1.0)
    merged = merge(adapters, MergeConfig(merger="ta"), table)
    batch = engine.prepared["alpha"].batches[0].inputs
    with torch.no_grad():
        plain = engine.model(**batch).logits
        with side.installed():
            functional = engine.model(**batch).logits
        with engine.apply(merged_deltas(merged)):
            materialised = engine.model(**batch).logits
        after = engine.model(**batch).logits
    assert (functional - plain).abs().max() > 1e-3  # the side path changes the output
    assert torch.allclose(functional, materialised, atol=1e-5, rtol=0)
    assert torch.equal(after, plain)  # hooks removed


@pytest.mark.slow
def test_constant_coefficients_on_conv1d_match_a_materialised_weight(gpt2_task_dirs):
    """On GPT-2 Conv1D (fan_in_fan_out): all λ = c gives W0 + c Σ s_k B_k A_k."""
    from tiny_models import patched_forward, tiny_gpt2, token_inputs

    from loramerge_cli.adapters.peft_reader import load_adapters
    from loramerge_cli.merging.merge import module_paths

    adapters = load_adapters([f"{name}={folder}" for name, folder in gpt2_task_dirs.items()])
    model, inputs, c = tiny_gpt2(), token_inputs(), 0.7
    freeze(model)
    paths = module_paths(adapters)
    side = SidePath(dict(model.named_modules()), adapters, paths, "cpu", torch.float32, init=c)
    with torch.no_grad(), side.installed():
        functional = model(**inputs).logits
    deltas = {path: c * sum(a.modules[path].delta(torch.float32) for a in adapters if path in a.modules)
              for path in paths}
    assert torch.allclose(functional, patched_forward(tiny_gpt2(), deltas, inputs), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_gradients_are_finite_with_alpha_not_r_and_under_bf16_autocast(problem):
    adapters = problem.adapters
    assert any(m.scale != 1.0 for a in adapters for m in a.modules.values())  # α = 8, r = 4
    engine = problem.engine
    for autocast in (False, True):
        side = SidePath(engine.modules, adapters, problem.paths, engine.device, engine.dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            train_step(problem, side, NscSettings(batch_size=4), step=0)
        gradient = side.coefficients.grad
        assert torch.isfinite(gradient).all()
        assert gradient[:, problem.paths.index("model.layers.0.self_attn.v_proj")].abs().min() > 0
        assert torch.equal(gradient[:, problem.paths.index("model.layers.1.self_attn.q_proj")], torch.zeros(3))


# --- targets -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_default_targets_on_llama_and_vit(problem, tmp_path):
    assert problem.targets == ["model.layers.1.self_attn.v_proj"]  # the value projection has LoRA
    named = list(problem.engine.model.named_modules())
    lora = problem.paths + ["model.layers.1.self_attn.o_proj"]
    assert resolve_targets(named, lora) == ["model.layers.1.self_attn.v_proj"]  # before the output projection
    no_value = [path for path in lora if not path.endswith("v_proj")]
    assert resolve_targets(named, no_value) == ["model.layers.1.self_attn.o_proj"]  # then the output projection
    only_query = [path for path in no_value if not path.endswith("o_proj")]
    assert resolve_targets(named, only_query) == ["model.layers.1.self_attn.q_proj"]  # then the last LoRA one
    assert resolve_targets(named, lora, ["0", "1"], ["q_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    vit = build_vit_classifier(tmp_path / "vit")
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(str(vit))
    vit_lora = [name for name, _ in model.named_modules() if name.endswith(("q_proj", "v_proj", "o_proj", "fc1"))]
    assert resolve_targets(list(model.named_modules()), vit_lora) == ["vit.layers.1.attention.v_proj"]
    without_value = [name for name in vit_lora if not name.endswith("v_proj")]
    assert resolve_targets(list(model.named_modules()), without_value) == ["vit.layers.1.attention.o_proj"]


@pytest.mark.slow
def test_targets_that_match_nothing_are_an_error_not_a_zero_loss(problem):
    named = list(problem.engine.model.named_modules())
    with pytest.raises(LoramergeError, match="'out_proj' names no LoRA module of blocks"):
        resolve_targets(named, problem.paths, None, ["out_proj"])
    with pytest.raises(LoramergeError, match="'o_prj' names no LoRA module"):  # a typo beside a good name
        resolve_targets(named, problem.paths, None, ["v_proj", "o_prj"])
    with pytest.raises(LoramergeError, match="no targeted module"):
        resolve_targets(named, ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"])
    with pytest.raises(LoramergeError, match="no block with LoRA"):
        resolve_targets(named, problem.paths, ["9", "10", "11"])


def test_a_target_no_coefficient_reaches_is_one_line_before_any_step(setting, problem, tmp_path):
    """Block 0's value projection reads the embeddings: its ratio is a constant. NSC used to stop at its first step
    with an internal autograd error, and label-free ENMP would have averaged a constant into every candidate."""
    assert problem.targets == ["model.layers.1.self_attn.v_proj"]  # block 0's LoRA reaches block 1: no error
    both = replace(request(setting).nsc, target_blocks=["0", "1"])
    message = "no merge coefficient reaches the input of model.layers.0.self_attn.v_proj \\(no LoRA"
    for batch_size in (1, None):  # --strategy nsc, --fitness nsc
        with pytest.raises(LoramergeError, match=message):
            build_nsc_problem(request(setting, nsc=both), batch_size=batch_size)
    message = message.replace(" \\(", " (")
    out = tmp_path / "coeffs.json"
    result = invoke_cli(["search-mask", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file,
                         "--strategy", "nsc", "--target-blocks", "0", "--threads", "1", "--out", out])
    assert result.exit_code == 1 and message in result.stderr and "internal error" not in result.stderr
    assert not out.exists()


# --- training, output, resume ------------------------------------------------------------------------

def test_batch_order_is_seeded_and_covers_each_epoch():
    first_epoch = [i for step in range(3) for i in batch_indices(1, "alpha", 10, 4, step)]
    assert sorted(first_epoch) == list(range(10)) and len(batch_indices(1, "alpha", 10, 4, 2)) == 2
    assert batch_indices(1, "alpha", 10, 4, 3) == batch_indices(1, "alpha", 10, 4, 3)
    assert batch_indices(1, "alpha", 10, 4, 3) != batch_indices(2, "alpha", 10, 4, 3)


@pytest.mark.slow
def test_cli_learns_coefficients_from_inputs_only_and_merge_applies_them(setting, tmp_path):
    """No labels in the data, no label field; the table is unit=module, scale 1; merge --mask with ta
    gives W0 + Σ_k λ_k B̃_k A_k exactly."""
    import yaml

    spec = yaml.safe_load(setting.tasks_file.read_text())
    for task in spec["tasks"]:
        rows = [json.loads(line) for line in open(task["data"]["validation"])]
        path = tmp_path / f"{task['name']}.jsonl"
        path.write_text("".join(json.dumps({"premise": r["premise"], "hypothesis": r["hypothesis"]}) + "\n"
                                for r in rows))
        task.pop("label")
        task["data"] = {"validation": str(path)}
    tasks_file = write_tasks_file(tmp_path / "inputs.yaml", spec)
    out = tmp_path / "coeffs.json"
    result = invoke_cli(["search-mask", "--adapters", *setting.adapter_args(), "--tasks", tasks_file,
                         "--strategy", "nsc", "--steps", "4", "--batch-size", "8", "--lr", "0.05", "--threads", "1",
                         "--out", out])
    assert result.exit_code == 0, result.stderr
    assert "model.layers.1.self_attn.v_proj" in result.stderr  # the resolved targets are printed
    table = load_table(out)
    assert table.unit == "module" and table.scale == 1.0 and table.merger is None
    assert table.provenance["targets"] == ["model.layers.1.self_attn.v_proj"]
    assert any(abs(v - 0.4) > 1e-3 for row in table.weights for v in row)  # trained away from the init
    per_task = table.provenance["task_losses"]  # each task's objective at the start and learned, printed too
    assert per_task["tasks"] == table.tasks and per_task["start"] != per_task["end"]
    assert "loss over each task's inputs, start -> learned" in result.stdout  # the summary is the result: stdout
    assert len(table.provenance["warnings"]) == sum(after > before for before, after in
                                                    zip(per_task["start"], per_task["end"]))
    merged = invoke_cli(["merge", "--adapters", *setting.adapter_args(), "--mask", out, "--out", tmp_path / "m"])
    assert merged.exit_code == 0, merged.stderr
    from loramerge_cli.adapters.peft_reader import load_adapter, load_adapters

    adapters = load_adapters(setting.adapter_args())
    written = load_adapter(f"m={tmp_path / 'm'}")
    for column, path in enumerate(table.units):
        expected = sum(table.weights[t][column] * a.modules[path].delta() for t, a in enumerate(adapters))
        assert torch.allclose(written.modules[path].delta(), expected, atol=1e-5)


def test_cli_init_sets_the_starting_coefficients_and_rejects_nan(setting, tmp_path):
    common = ["search-mask", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file,
              "--strategy", "nsc", "--steps", "1", "--batch-size", "4", "--threads", "1"]
    out = tmp_path / "coeffs.json"
    result = invoke_cli([*common, "--init", "0.25", "--lr", "1e-9", "--out", out])
    assert result.exit_code == 0, result.stderr
    table = load_table(out)
    present = [v for row in table.weights for v in row if v != 0]
    assert present and all(abs(v - 0.25) < 1e-6 for v in present)  # one step of lr 1e-9 barely moves them
    assert table.provenance["search"]["init"] == 0.25
    bad = invoke_cli([*common, "--init", "nan", "--out", tmp_path / "bad.json"])
    assert bad.exit_code == 2 and "--init must be a number from -1000 to 1000 (got nan)" in bad.stderr, bad.stderr
    assert not (tmp_path / "bad.json").exists()


@pytest.mark.slow
def test_interrupted_training_resumes_to_the_same_coefficients(setting, tmp_path):
    plain, plain_provenance = run_search(request(setting))

    def interrupt(kind, data):
        if kind == "step" and data["step"] == 3:  # checkpoints at 2, 4, 6: resume redoes step 3
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_search(request(setting, run_dir=tmp_path), on_event=interrupt)
    resumed, provenance = run_search(request(setting, run_dir=tmp_path, resume=True))
    assert resumed.weights == plain.weights
    assert [r["loss"] for r in provenance["history"]] == [r["loss"] for r in plain_provenance["history"]]
    assert len((tmp_path / "trajectory.jsonl").read_text().splitlines()) == 6
    other, _ = run_search(request(setting, nsc=replace(request(setting).nsc, seed=2)))
    assert other.weights != plain.weights
    with pytest.raises(LoramergeError, match="settings differ"):
        run_search(request(setting, run_dir=tmp_path, resume=True, nsc=replace(request(setting).nsc, lr=0.1)))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "nsc_state.safetensors"), framework="pt") as state:  # no pickle to resume
        assert {"coefficients", "adamw.exp_avg", "adamw.exp_avg_sq"} <= set(state.keys())
        assert int(state.metadata()["step"]) == 6
    (tmp_path / "nsc_state.safetensors").write_bytes(b"not a state")
    with pytest.raises(LoramergeError, match="is not a readable NSC state"):
        run_search(request(setting, run_dir=tmp_path, resume=True))


@pytest.mark.slow
def test_nsc_training_lowers_its_loss_on_a_fixed_batch(setting):
    """Full-batch steps (batch ≥ examples): the objective must go down."""
    settings = NscSettings(steps=15, batch_size=64, lr=0.05)
    table, provenance = run_search(request(setting, nsc=settings, report_test=True))
    assert provenance["loss"]["last"] < provenance["loss"]["first"] - 1e-3
    test = provenance["test"]  # --report-test: the coefficient merge beside ta at its default λ, on test
    assert set(test["coefficients_test_accuracy"]) == {"alpha", "beta", "gamma"}
    assert test["coefficients_test_accuracy"] != test["ta_default_test_accuracy"]


@pytest.mark.slow
def test_entropy_objective_lowers_prediction_entropy(setting):
    settings = NscSettings(steps=15, batch_size=64, lr=0.05, objective="entropy")
    table, provenance = run_search(request(setting, nsc=settings))
    assert provenance["targets"] == [] and provenance["objective"] == "entropy"
    assert provenance["loss"]["last"] < provenance["loss"]["first"] - 1e-3
    with pytest.raises(LoramergeError, match="at most|must be"):
        run_search(request(setting, nsc=replace(settings, objective="perplexity")))


# --- label-free ENMP ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_label_free_enmp_fitness_is_the_relative_loss_reduction(setting):
    from loramerge_cli.masks import ones_table
    from loramerge_cli.search.enmp import EnmpSettings
    from loramerge_cli.search.fitness import pruned_table
    from loramerge_cli.search.nsc_objectives import NullSpaceObjective

    search = request(setting, strategy="enmp", fitness="nsc", merge=MergeConfig(merger="ties"),
                     enmp=EnmpSettings(popsize=6, generations=3, max_prune=0.5, seed=3))
    table, provenance = run_search(search)
    validation = provenance["validation"]
    assert validation["fitness"] >= 0.0 and provenance["fitness"] == "nsc"
    assert table.pruned_count() == len(provenance["pruned_flat_indices"])
    # recompute both losses by hand: merge, patch, average ω over every validation token
    from loramerge_cli.adapters.peft_reader import load_adapters

    adapters = load_adapters(setting.adapter_args())
    engine = Evaluator(load_task_file(setting.tasks_file), adapters, EvalSettings(threads=1, batch_size=8))
    objective = NullSpaceObjective(adapters, engine.modules, ["model.layers.1.self_attn.v_proj"], "cpu")

    def loss(pruned):
        merged = merge(adapters, MergeConfig(merger="ties"), pruned_table(ones_table(adapters), pruned))
        values = []
        with engine.apply(merged_deltas(merged)), torch.no_grad():
            for index, adapter in enumerate(adapters):
                path = objective.targets[0]
                A, gram_inverse = objective.factors[index][path]
                omegas = []
                for batch in engine.prepared[adapter.name].batches:
                    recorder = InputRecorder(engine.modules, [path])
                    with recorder.installed():
                        engine.model(**batch.inputs)
                    z = recorder.inputs[path][batch.inputs["attention_mask"].bool()]
                    omegas.append(null_space_ratio(z, A, gram_inverse))
                values.append(float(torch.cat(omegas).mean()))
        return sum(values) / len(values)

    unpruned = loss(())
    assert abs(validation["unpruned_loss"] - unpruned) < 1e-6
    best = loss(tuple(provenance["pruned_flat_indices"]))
    assert abs(validation["fitness"] - 100 * (unpruned - best) / unpruned) < 1e-4


# --- other model types -------------------------------------------------------------------------------

@pytest.mark.slow
def test_vit_adapters_without_heads_train_on_images_alone(tmp_path):
    """Image inputs, no labels in the spec's eyes (folder names are ignored by NSC), no heads at all."""
    from PIL import Image

    base = build_vit_classifier(tmp_path / "vit")
    adapters = []
    for index, name in enumerate(("shapes", "colors")):
        folder = save_peft_adapter(base, tmp_path / name, ["q_proj", "v_proj", "o_proj"],
                                   "AutoModelForImageClassification", None, seed=7 + index)
        adapters.append(f"{name}={folder}")
    generator = torch.Generator().manual_seed(0)
    (tmp_path / "images" / "any").mkdir(parents=True)
    for index in range(6):
        pixels = (torch.rand(8, 8, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / "images" / "any" / f"{index}.png")
    tasks = [{"name": name, "data": {"validation": "images"}} for name in ("shapes", "colors")]
    tasks_file = write_tasks_file(tmp_path / "tasks.yaml", {"base_model": str(base),
                                                           "model_type": "image-classification", "tasks": tasks})
    search = SearchRequest(adapters=adapters, merge=MergeConfig(), tasks=tasks_file,
                           eval=EvalSettings(threads=1), strategy="nsc",
                           nsc=NscSettings(steps=3, batch_size=4, lr=0.05))
    table, provenance = run_search(search)
    assert provenance["targets"] == ["vit.layers.1.attention.v_proj"]  # the value projection has LoRA
    assert len(table.units) == 6 and any(abs(v - 0.4) > 1e-3 for row in table.weights for v in row)
    with pytest.raises(LoramergeError, match="no head"):
        run_search(replace(search, nsc=replace(search.nsc, objective="entropy")))


@pytest.mark.slow
def test_causal_lm_tasks_read_the_prompt_only(tmp_path):
    from eval_fixtures import build_gpt2_lm, write_jsonl
    from transformers import AutoTokenizer

    base = build_gpt2_lm(tmp_path / "gpt2")
    folder = save_peft_adapter(base, tmp_path / "wiki", ["c_attn", "c_proj"], "AutoModelForCausalLM", "CAUSAL_LM",
                               seed=3, fan_in_fan_out=True)
    write_jsonl(tmp_path / "val.jsonl", [{"q": "w1 w2 w3"}, {"q": "w4"}, {"q": "w5 w6"}])
    tasks_file = write_tasks_file(tmp_path / "tasks.yaml", {
        "base_model": str(base), "model_type": "causal-lm",
        "tasks": [{"name": "wiki", "data": {"validation": "val.jsonl"}, "prompt": "{q}", "choices": [" yes", " no"]}],
    })
    search = SearchRequest(adapters=[f"wiki={folder}"], merge=MergeConfig(), tasks=tasks_file,
                           eval=EvalSettings(threads=1), strategy="nsc", nsc=NscSettings(steps=2, batch_size=2))
    problem = build_nsc_problem(search)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    for example, text in zip(problem.examples["wiki"], ("w1 w2 w3", "w4", "w5 w6")):
        assert example["input_ids"][0].tolist() == tokenizer(text)["input_ids"]
    assert problem.targets == ["transformer.h.1.attn.c_proj"]
    table, _ = run_search(search)
    assert table.units == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                           "transformer.h.0.mlp.c_proj", "transformer.h.1.attn.c_attn",
                           "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"]


@pytest.mark.slow
def test_cli_label_free_enmp(setting, tmp_path):
    out = tmp_path / "mask.json"
    result = invoke_cli(["search-mask", "--strategy", "screened",
                         "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file,
                         "--merger", "ta", "--fitness", "nsc", "--popsize", "4", "--generations", "2",
                         "--max-prune", "0.5", "--threads", "1", "--out", out])
    assert result.exit_code == 0, result.stderr
    printed = " ".join(result.stderr.split())  # rich wraps lines
    assert "targets: model.layers.1.self_attn.v_proj" in printed  # progress: stderr
    assert "validation nsc loss" in " ".join(result.stdout.split())  # the summary: stdout
    table = load_table(out)
    assert table.unit == "block" and table.provenance["fitness"] == "nsc"
    assert table.provenance["validation"]["fitness"] >= 0.0
    refused = invoke_cli(["search-mask", "--strategy", "screened",
                          "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file,
                          "--fitness", "nsc", "--lambda", "auto", "--out", tmp_path / "x.json"])
    assert refused.exit_code == 2 and "--lambda auto" in refused.stderr  # a usage error (issue 12)


@pytest.mark.slow
def test_label_free_enmp_in_parallel_workers_equals_serial(setting):
    from loramerge_cli.search.enmp import EnmpSettings

    search = request(setting, strategy="enmp", fitness="nsc",
                     enmp=EnmpSettings(popsize=4, generations=2, max_prune=0.5, seed=5))
    serial, serial_provenance = run_search(search)
    parallel, provenance = run_search(replace(search, devices=["cpu", "cpu"]))
    assert parallel.weights == serial.weights
    assert provenance["validation"] == serial_provenance["validation"]


def test_per_task_losses_are_exact_over_batches_and_a_risen_task_is_warned_about(problem):
    """task_losses gives the same per-task objective whatever the batch size; raised_tasks measures the
    start at every coefficient = init, leaves the learned coefficients as they were, and warns about
    exactly the tasks whose objective rose."""
    from loramerge_cli.search.nsc import raised_tasks, task_losses

    side_path = SidePath(problem.engine.modules, problem.adapters, problem.paths, problem.engine.device,
                         problem.engine.dtype, 0.4)
    at_init = task_losses(problem, side_path, batch_size=1000)
    assert task_losses(problem, side_path, batch_size=3) == pytest.approx(at_init, rel=1e-5)
    with torch.no_grad():  # task 0 alone at 0, the others at 1.2: some tasks' objectives must move
        side_path.coefficients.fill_(1.2)
        side_path.coefficients[0] = 0.0
    learned = side_path.coefficients.detach().clone()
    per_task, warnings = raised_tasks(problem, side_path, NscSettings(init=0.4, batch_size=5))
    assert torch.equal(side_path.coefficients.detach(), learned)
    assert per_task["start"] == pytest.approx(at_init, rel=1e-5)
    assert per_task["end"] == pytest.approx(task_losses(problem, side_path, batch_size=1000), rel=1e-5)
    risen = [name for name, before, after in zip(per_task["tasks"], per_task["start"], per_task["end"])
             if after > before]
    assert 0 < len(risen) < len(problem.adapters)  # the test needs both kinds of task
    assert [warning.split()[5] for warning in warnings] == risen


def test_the_per_task_check_reads_at_most_its_example_cap(problem, monkeypatch):
    from loramerge_cli.search import nsc

    side_path = SidePath(problem.engine.modules, problem.adapters, problem.paths, problem.engine.device,
                         problem.engine.dtype, 0.4)
    monkeypatch.setattr(nsc, "CHECK_EXAMPLES", 4)
    per_task, _ = nsc.raised_tasks(problem, side_path, NscSettings(init=0.4, batch_size=3))
    assert per_task["examples"] == {a.name: 4 for a in problem.adapters}
    first_four = nsc.task_losses(problem, side_path, batch_size=100, limit=4)
    assert per_task["start"] == pytest.approx(first_four, rel=1e-5)
    assert first_four != pytest.approx(nsc.task_losses(problem, side_path, batch_size=100), rel=1e-5)
