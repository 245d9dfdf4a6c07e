"""Defects found by this round's reviews (architectures the other tests do not build, merging memory and speed),
each with a test that fails without its fix."""

from __future__ import annotations

import os

import pytest
import torch
from factories import random_adapter
from tiny_models import HIDDEN, NUM_LABELS, VOCAB, peft_lora, save_lora, seeded

from loramerge_cli import api
from loramerge_cli.adapters.model import Adapter
from loramerge_cli.merging.lowrank import LowRank, thin_svd, truncate_dense


def tiny_roberta(seed: int = 0):
    """A 2-block RobertaForSequenceClassification: its head `classifier` has two layers (dense, out_proj)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=40, num_labels=NUM_LABELS, pad_token_id=0,
                           type_vocab_size=1)
    with seeded(seed):
        return RobertaForSequenceClassification(config).eval()


def test_a_head_of_several_layers_is_written_as_the_inputs_name_it(tmp_path):
    """RoBERTa's `classifier` (dense + out_proj) was written as modules_to_save ["classifier.dense",
    "classifier.out_proj"], which PEFT cannot load (KeyError). The config's own name is written now."""
    from peft import PeftModel

    folders = []
    for seed, name in ((1, "a"), (2, "b")):
        model = peft_lora(tiny_roberta(), seed, task_type="SEQ_CLS", r=2, target_modules=["query", "value"],
                          modules_to_save=["classifier"])
        model.save_pretrained(str(tmp_path / name))
        folders.append(f"{name}={tmp_path / name}")
    adapters = api.load_adapters(folders)
    assert adapters[0].head_modules == ["classifier"]
    out = api.write_merged_adapter(api.merge(adapters, api.MergeConfig(merger="ta")), adapters, tmp_path / "merged",
                                   head="a")
    loaded = PeftModel.from_pretrained(tiny_roberta(), str(out)).eval()  # raised KeyError before
    head = {name: parameter for name, parameter in loaded.named_parameters() if "modules_to_save" in name}
    assert head and all(torch.equal(parameter, adapters[0].heads[name.replace("base_model.model.", "").replace(
        ".modules_to_save.default", "")].to(parameter.dtype)) for name, parameter in head.items())


def adapter_with_heads(keys: list[str], listed: list[str] | None) -> Adapter:
    adapter = random_adapter("a", {"model.layers.0.q_proj": (4, 4)})
    adapter.config["modules_to_save"] = listed
    adapter.heads = {key: torch.zeros(1) for key in keys}
    return adapter


@pytest.mark.parametrize("keys, listed, expected", [
    (["classifier.dense.weight", "classifier.out_proj.bias"], ["classifier", "score"], ["classifier"]),
    (["classifier.dense.weight", "classifier.out_proj.bias"], None, ["classifier.dense", "classifier.out_proj"]),
    (["score.weight"], ["classifier", "score"], ["score"]),
    (["model.head.fc.weight", "extra.weight"], ["head"], ["extra", "head"]),
    (["classifier.weight"], ["fier"], ["classifier"]),  # a name matches whole path components only
])
def test_head_modules_are_the_configured_names_that_hold_the_heads(keys, listed, expected):
    assert adapter_with_heads(keys, listed).head_modules == expected


@pytest.mark.parametrize("shape", [(6, 40), (40, 6), (9, 9)])
def test_thin_svd_of_a_wide_matrix_is_that_of_its_transpose(shape):
    X = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    U, S, Vh = thin_svd(X)
    assert U.shape == (shape[0], min(shape)) and Vh.shape == (min(shape), shape[1])
    assert torch.allclose(U @ torch.diag(S) @ Vh, X, atol=1e-12)
    assert torch.allclose(U.T @ U, torch.eye(min(shape), dtype=X.dtype), atol=1e-12)
    assert torch.allclose(S, torch.linalg.svdvals(X), atol=1e-12)


def test_lambda_scales_the_truncated_factors_of_a_dense_result():
    """λ is applied to the factors after the truncation (no scaled m×n copy): the same update, error and rank."""
    from loramerge_cli.merging import merge as merging

    generator = torch.Generator().manual_seed(5)
    tasks = [LowRank(torch.randn(30, 3, generator=generator, dtype=torch.float64),
                     torch.randn(3, 20, generator=generator, dtype=torch.float64)) for _ in range(2)]
    dense = sum(task.dense() for task in tasks)
    adapters = [random_adapter("a", {"m": (30, 20)})]
    for lam in (0.3, -2.0, 0.0):
        settings = merging.resolve_config(merging.MergeConfig(merger="ties", lam=lam, energy=0.9), 1)
        module = merging._finish("m", dense, adapters, [(0, 1.0)], settings)
        factors, error, _ = truncate_dense(dense * lam, None, 0.9, 3)
        assert module.rank == factors.left.shape[1]
        assert error == 0.0 or module.truncation_error == pytest.approx(error)
        assert torch.allclose(module.lora_B @ module.lora_A, factors.left @ factors.right, atol=1e-10)


def test_a_planned_merge_keeps_each_module_as_it_is_written(tmp_path):
    """execute() kept every module's factors in float64 until the write (11 GB for an 8B rank-64 set held at
    once): each is now cast to the output dtype as it is finished, and the folder holds exactly those tensors."""
    from safetensors.torch import load_file

    folders = [f"{name}={save_lora('llama', tmp_path / name, seed, r=2, target_modules=['q_proj', 'v_proj'])}"
               for seed, name in ((1, "a"), (2, "b"))]
    adapters = api.load_adapters(folders)
    for dtype in ("bfloat16", "float16"):
        plan = api.plan_merge(adapters, api.MergeConfig(merger="ties"), out=tmp_path / f"merged_{dtype}", dtype=dtype)
        result = api.execute(plan)
        assert {module.lora_B.dtype for module in result.modules.values()} == {getattr(torch, dtype)}
        written = load_file(str(api.write(plan, result) / "adapter_model.safetensors"))
        for path, module in result.modules.items():
            assert torch.equal(written[f"base_model.model.{path}.lora_B.weight"], module.lora_B)
            assert torch.equal(written[f"base_model.model.{path}.lora_A.weight"], module.lora_A)


def test_inputs_the_model_refuses_are_one_line_naming_the_task(tmp_path):
    """T5's classifier raises ValueError on an example without its end-of-sequence token: that was reported as
    an internal error; it is the task's inputs, one line, exit 1."""
    from eval_fixtures import SPECIAL, save_peft_adapter, save_word_tokenizer, text_rows, vocab_size, write_jsonl
    from eval_fixtures import write_tasks_file
    from factories import invoke_cli
    from transformers import T5Config, T5ForSequenceClassification

    config = T5Config(vocab_size=vocab_size(), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, num_labels=3,
                      pad_token_id=0, eos_token_id=SPECIAL.index("[EOS]"), decoder_start_token_id=0)
    with seeded(0):
        T5ForSequenceClassification(config).eval().save_pretrained(str(tmp_path / "base"))
    save_word_tokenizer(tmp_path / "base")  # its template adds no [EOS]
    save_peft_adapter(tmp_path / "base", tmp_path / "a", ["q", "v"], "T5ForSequenceClassification", "SEQ_CLS", 1,
                      head_modules=["classification_head"])
    data = write_jsonl(tmp_path / "validation.jsonl", text_rows(4, seed=1))
    tasks = write_tasks_file(tmp_path / "tasks.yaml", {
        "base_model": str(tmp_path / "base"), "model_type": "sequence-classification",
        "tasks": [{"name": "a", "data": {"validation": str(data)}, "text": ["premise", "hypothesis"], "label": "label",
                   "num_labels": 3, "head": "from-adapter"}]})
    outcome = invoke_cli(["eval", "--adapters", f"a={tmp_path / 'a'}", "--tasks", tasks, "--split", "validation",
                          "--quiet"])
    assert outcome.exit_code == 1, outcome.stderr
    assert outcome.stderr.strip().splitlines() == ["error: task a: the model refuses its inputs: Each example "
                                                     "must contain at least one <eos> token."]


@pytest.mark.parametrize("swap", [True, False], ids=["exchange", "rename"])
@pytest.mark.parametrize("before", ["absent", "a loramerge output"])
def test_a_folder_that_appears_at_out_during_the_write_survives_force(tmp_path, monkeypatch, swap, before):
    """`--force` checked --out when the write started only: a user's folder made there while the merge ran was
    swapped out and deleted. It is checked again, and put back if it changed between the check and the swap."""
    from loramerge_cli import outputs
    from loramerge_cli.errors import LoramergeError

    if not swap:
        monkeypatch.setattr(outputs, "exchange", lambda first, second: False)
    target = tmp_path / "merged"
    if before != "absent":
        with outputs.staged_folder(target) as staging:
            (staging / outputs.MARKER).write_text("{}")

    def users_folder():
        if target.exists():
            import shutil

            shutil.rmtree(target)
        (target / "mywork").mkdir(parents=True)
        (target / "mywork" / "notes.txt").write_text("precious")

    with pytest.raises(LoramergeError, match="did not write"):
        with outputs.staged_folder(target, force=True) as staging:
            (staging / outputs.MARKER).write_text("{}")
            users_folder()
    assert (target / "mywork" / "notes.txt").read_text() == "precious"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged"]  # no staging left

    real_check = outputs._check_replaceable  # the folder appears after the last check, before the swap
    monkeypatch.setattr(outputs, "_check_replaceable", lambda *args: users_folder())
    (target / "mywork" / "notes.txt").unlink()
    (target / "mywork").rmdir()
    (target / outputs.MARKER).write_text("{}")
    with pytest.raises(LoramergeError, match="changed while the output was written"):
        with outputs.staged_folder(target, force=True) as staging:
            (staging / outputs.MARKER).write_text("{}")
    monkeypatch.setattr(outputs, "_check_replaceable", real_check)
    assert (target / "mywork" / "notes.txt").read_text() == "precious"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged"]


def test_a_killed_runs_temporary_files_leave_the_run_dir_when_it_is_next_used(tmp_path):
    """SIGKILL while a run-dir file was rewritten left `.scores.json.loramerge-PID.tmp` for good (a resume or a
    fresh run kept it); the next search that takes the run dir's lock removes those of dead processes."""
    import subprocess
    import sys

    from loramerge_cli.search.rundir import RunDirLock

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    left = [run_dir / f".scores.json.loramerge-{pid}.tmp", run_dir / f".config.json.loramerge-{pid}.tmp"]
    for path in left:
        path.write_text("{")
    mine = run_dir / f".best.json.loramerge-{os.getpid()}.tmp"  # a live process's: kept
    kept = [run_dir / "scores.json", run_dir / "notes.loramerge-1.tmp", mine]
    for path in kept:
        path.write_text("{}")
    with RunDirLock(run_dir):
        assert not any(path.exists() for path in left)
        assert all(path.exists() for path in kept)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_della_ranks_by_bit_pattern_equal_a_stable_float_sort(dtype):
    magnitude = torch.randn(5000, generator=torch.Generator().manual_seed(2), dtype=torch.float64).abs().to(dtype)
    magnitude[::7], magnitude[::11], magnitude[5] = magnitude[3], 0.0, float("1e-310")  # ties, zeros, a subnormal
    order = torch.sort(magnitude, stable=True).indices
    expected = torch.empty_like(order)
    expected[order] = torch.arange(order.numel())
    from loramerge_cli.merging.sparsify import magnitude_ranks

    assert torch.equal(magnitude_ranks(magnitude), expected)
    assert torch.equal(magnitude_ranks(magnitude[::3]), magnitude_ranks(magnitude[::3].clone()))  # a strided view


def test_a_searchs_merged_module_cache_is_bounded_and_changes_no_score():
    """The cache of merged modules a search keeps grew without bound (every distinct pruning of a block; on an 8B
    model gigabytes): it now keeps the most recently used within a budget, in float32, and the updates the
    candidates are scored with are bit for bit those of the unbounded float64 cache."""
    from loramerge_cli.masks import WeightTable
    from loramerge_cli.merging import merge as merging
    from loramerge_cli.search.fitness import CandidateMerges, MergedModuleCache

    shapes = {f"model.layers.{block}.self_attn.{name}": (12, 10) for block in range(4) for name in ("q_proj", "v_proj")}
    adapters = [random_adapter(name, shapes, seed=seed) for seed, name in enumerate("abc")]
    units = [f"model.layers.{block}" for block in range(4)]
    template = WeightTable(list("abc"), units, [[1.0] * 4 for _ in range(3)])
    candidates = [(), (0,), (1, 5), (0,), (11,), (2, 3, 7), (1, 5), (), (4,)] * 2
    for merger in ("ties", "ta"):
        settings = merging.resolve_config(merging.MergeConfig(merger=merger), 3, template)
        bounded, unbounded = CandidateMerges(adapters, settings, template, None), \
            CandidateMerges(adapters, settings, template, None)
        bounded.cache, unbounded.cache = MergedModuleCache(budget_mb=3000 / 2**20), {}
        for pruned in candidates:
            fast, slow = bounded.candidate_deltas(pruned, None), unbounded.candidate_deltas(pruned, None)
            assert fast.keys() == slow.keys()
            assert all(torch.equal(fast[path].left, slow[path].left) and torch.equal(fast[path].right, slow[path].right)
                       for path in fast)
            assert bounded.cache.size <= 3000 or len(bounded.cache) == 1
        assert len(bounded.cache) < len(unbounded.cache)
        assert {module.lora_B.dtype for module in bounded.cache.values()} == {torch.float32}


def test_the_library_merge_without_an_output_keeps_float64_factors(tmp_path):
    """Only a plan that writes keeps its modules in the output dtype: api.merge (no output) returns the float64
    factors, which a later write in another dtype rounds once, from them."""
    folders = [f"{name}={save_lora('llama', tmp_path / name, seed, r=2, target_modules=['q_proj'])}"
               for seed, name in ((1, "a"), (2, "b"))]
    adapters = api.load_adapters(folders)
    for adapter in adapters:
        for module in adapter.modules.values():
            module.lora_A, module.lora_B = module.lora_A.to(torch.bfloat16), module.lora_B.to(torch.bfloat16)
    result = api.merge(adapters, api.MergeConfig(merger="ties", lam=3e4))
    assert {module.lora_B.dtype for module in result.modules.values()} == {torch.float64}


def test_a_users_folder_a_swap_took_out_is_kept_when_it_cannot_go_back(tmp_path, monkeypatch):
    """The swap back of a user's folder can fail (--out moved again): the folder is then kept beside --out under
    a name no cleanup removes, and the error says where; it was deleted with the staging folder."""
    from loramerge_cli import outputs
    from loramerge_cli.errors import LoramergeError

    target = tmp_path / "merged"
    with outputs.staged_folder(target) as staging:
        (staging / outputs.MARKER).write_text("{}")
    real_exchange, calls = outputs.exchange, []

    def exchange_once(first, second):
        calls.append(first)
        if len(calls) > 1:
            raise OSError(2, "No such file or directory", str(second))
        return real_exchange(first, second)

    monkeypatch.setattr(outputs, "exchange", exchange_once)
    monkeypatch.setattr(outputs, "_check_replaceable", lambda *args: None)  # it changes after the last check
    with pytest.raises(LoramergeError, match="it is kept at .*merged.yours-"):
        with outputs.staged_folder(target, force=True) as staging:
            (staging / outputs.MARKER).write_text("{}")
            (target / outputs.MARKER).unlink()
            (target / "notes.txt").write_text("precious")
    kept = [path for path in tmp_path.iterdir() if path.name.startswith("merged.yours-")]
    assert len(kept) == 1 and (kept[0] / "notes.txt").read_text() == "precious"
    assert (target / outputs.MARKER).is_file()  # the new output took --out
    outputs.clean_debris(target)  # the next run's cleanup leaves it alone
    assert (kept[0] / "notes.txt").read_text() == "precious"


def test_run_dir_cleanup_is_best_effort(tmp_path, monkeypatch):
    """A pid past any process's (OverflowError in os.kill) or an entry that cannot be removed does not stop a
    search from taking its run dir."""
    from loramerge_cli import outputs
    from loramerge_cli.search.rundir import RunDirLock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".x.loramerge-99999999999999999999.tmp").write_text("{")
    (run_dir / ".y.loramerge-99999999999999999998.tmp").write_text("{")
    real_unlink = type(run_dir).unlink

    def unlink(path, missing_ok=False):
        if path.name.startswith(".y."):
            raise PermissionError(13, "Permission denied", str(path))
        return real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(type(run_dir), "unlink", unlink)
    with RunDirLock(run_dir):
        assert sorted(path.name for path in run_dir.iterdir() if path.name.endswith(".tmp")) == [
            ".y.loramerge-99999999999999999998.tmp"]
    del outputs


def test_apply_mask_writes_the_others_when_a_table_prunes_a_whole_adapter(tmp_path):
    """A search may prune one task in every block (the bundled settings' tables do at --max-prune 0.5):
    apply-mask refused the search's own table and wrote nothing. The other adapters are written, the pruned one
    is named in a warning, and a --force rerun recognises the folder as its own."""
    import json

    from factories import attention_shapes, invoke_cli, write_peft_folder
    from safetensors.torch import load_file

    from loramerge_cli.masks import WeightTable

    sources = []
    for seed, name in enumerate("abc"):
        adapter = random_adapter(name, attention_shapes(blocks=2, m=12, n=10), seed=seed, dtype=torch.float32)
        adapter.heads = {"score.weight": torch.full((3, 12), float(seed))}
        adapter.config["task_type"] = "SEQ_CLS"
        sources.append(f"{name}={write_peft_folder(tmp_path / name, adapter)}")
    units = ["model.layers.0", "model.layers.1"]
    WeightTable(list("abc"), units, [[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]).save(tmp_path / "mask.json")
    command = ["apply-mask", "--adapters", *sources, "--mask", tmp_path / "mask.json", "--out", tmp_path / "pruned"]
    outcome = invoke_cli([*command, "--json"])
    assert outcome.exit_code == 0, outcome.stderr
    report = json.loads(outcome.stdout)
    assert [row["folder"] is None for row in report["adapters"]] == [False, False, True]
    assert any("every module of 'c'" in warning and "its task head is in" in warning and "all 3 tasks" in warning
               for warning in report["warnings"])
    assert sorted(path.name for path in (tmp_path / "pruned").iterdir()) == ["a", "b", "heads", "loramerge.yaml",
                                                                           "mask.json"]
    assert list(load_file(str(tmp_path / "pruned" / "heads" / "c.safetensors"))) == ["score.weight"]
    assert invoke_cli([*command, "--force"]).exit_code == 0
    (tmp_path / "pruned" / "heads" / "notes.txt").write_text("mine")  # not apply-mask's any more
    assert invoke_cli([*command, "--force"]).exit_code == 1
    WeightTable(list("abc"), units, [[0.0, 0.0]] * 3).save(tmp_path / "none.json")
    outcome = invoke_cli(["apply-mask", "--adapters", *sources, "--mask", tmp_path / "none.json", "--out",
                          tmp_path / "none"])
    assert outcome.exit_code == 1 and "nothing to write" in outcome.stderr and not (tmp_path / "none").exists()


def test_nsc_reads_a_module_input_flattened_over_batch_and_tokens():
    """OPT flattens batch and tokens before fc1 and fc2 ((batch·tokens, n)): NSC refused those targets ("does not
    line up with the attention mask"); the rows are the mask's tokens in order."""
    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.search.nsc_objectives import token_rows

    z = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert torch.equal(token_rows(z.reshape(6, 4), mask, "fc1"), token_rows(z, mask, "fc1"))
    with pytest.raises(LoramergeError, match="does not line up"):
        token_rows(z.reshape(3, 8), mask, "fc1")


def test_an_encoder_decoders_blocks_are_in_the_order_they_run():
    """T5's units sorted by name put the decoder first: the flat --indices order and NSC's default "last quarter
    of the blocks" (an encoder block) followed that. Encoder blocks come first now; other orders are unchanged."""
    from loramerge_cli.adapters.units import sorted_units

    t5 = ["decoder.block.1", "encoder.block.10", "decoder.block.0", "encoder.block.2"]
    assert sorted_units(t5) == ["encoder.block.2", "encoder.block.10", "decoder.block.0", "decoder.block.1"]
    bart = ["model.decoder.layers.0", "model.encoder.layers.0"]
    assert sorted_units(bart) == ["model.encoder.layers.0", "model.decoder.layers.0"]
    towers = ["vision_model.encoder.layers.1", "text_model.encoder.layers.0", "model.layers.10", "model.layers.9"]
    assert sorted_units(towers) == ["model.layers.9", "model.layers.10", "text_model.encoder.layers.0",
                                    "vision_model.encoder.layers.1"]


def test_nsc_defaults_to_the_decoders_self_attention_not_its_cross_attention():
    """With encoder blocks first, NSC's default blocks (the last quarter) are decoder blocks, whose last value
    projection is the cross-attention's: its input is the encoder's output, the same in every block. The
    default is the block's first attention, the self-attention."""
    from transformers import BartConfig, BartForSequenceClassification, T5Config, T5ForSequenceClassification

    from loramerge_cli.search.nsc_targets import resolve_targets

    bart = BartForSequenceClassification(BartConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=4, decoder_layers=4, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32))
    named = list(bart.named_modules())
    lora = [name for name, _ in named if name.rsplit(".", 1)[-1] in ("q_proj", "v_proj")]
    assert resolve_targets(named, lora) == [f"model.decoder.layers.{block}.self_attn.v_proj" for block in (2, 3)]
    t5 = T5ForSequenceClassification(T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=4,
                                              num_decoder_layers=4, num_heads=2))
    named = list(t5.named_modules())
    lora = [name for name, _ in named if name.rsplit(".", 1)[-1] in ("q", "v")]
    assert resolve_targets(named, lora) == [f"transformer.decoder.block.{block}.layer.0.SelfAttention.v"
                                            for block in (2, 3)]
