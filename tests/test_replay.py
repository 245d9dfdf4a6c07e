"""BlockReplay: a candidate's forward pass starts at its first changed block and scores exactly as in full."""

import pytest
import torch

from eval_fixtures import build_text_setting
from loramerge_cli.evaluation.cache import ScoreCache, expert_scores
from loramerge_cli.evaluation.engine import Delta, EvalSettings, Evaluator
from loramerge_cli.evaluation.replay import BlockReplay, find_blocks, same_delta
from loramerge_cli.evaluation.specs import load_task_file
from loramerge_cli.masks import ones_table
from loramerge_cli.merging.merge import MergeConfig, module_paths, resolve_config
from loramerge_cli.search.fitness import AccuracyFitness

LAYERS = 4


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    return build_text_setting(tmp_path_factory.mktemp("replay"), layers=LAYERS)


def fitness_for(setting, merger="ties", block_cache_mb=1024.0, batch_size=8):
    from loramerge_cli.adapters.peft_reader import load_adapters

    adapters = load_adapters(setting.adapter_args())
    engine = Evaluator(load_task_file(setting.tasks_file), adapters,
                       EvalSettings(threads=1, batch_size=batch_size, block_cache_mb=block_cache_mb))
    settings = resolve_config(MergeConfig(merger=merger), len(adapters))
    return AccuracyFitness(adapters, settings, ones_table(adapters), engine, expert_scores(engine, ScoreCache()))


def counting_forwards(blocks):
    calls = [0] * len(blocks)
    handles = [block.register_forward_pre_hook(lambda module, args, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, block in enumerate(blocks)]
    return calls, handles


def test_candidates_score_exactly_as_a_full_forward_and_skip_their_unchanged_blocks(setting):
    fitness = fitness_for(setting)
    replay = fitness.replay
    assert replay.enabled and sorted(replay.outputs) == list(range(LAYERS))
    task_count = len(fitness.adapters)
    assert not replay.verified
    replay.evaluate(fitness.candidate_deltas((task_count * 3,), None))  # the first replayed candidate also runs in full
    assert replay.verified and replay.enabled
    candidates = [(), (task_count * 3,), (task_count * 2 + 1, task_count * 3 + 2), (1,), (5, 9), (4, 8, 10, 11)]
    for pruned in candidates:
        deltas = fitness.candidate_deltas(pruned, None)
        first = replay.first_changed(deltas)
        assert first == (min(i // task_count for i in pruned) if pruned else LAYERS)
        calls, handles = counting_forwards(replay.blocks)
        try:
            replayed = replay.evaluate(deltas)
        finally:
            for handle in handles:
                handle.remove()
        assert replayed == fitness.engine.evaluate(deltas)  # bit for bit
        batches = sum(len(p.batches) for p in fitness.engine.prepared.values())
        assert calls == [0] * first + [batches] * (LAYERS - first)  # the real blocks before `first` never ran
    assert replay.verified and replay.enabled


def test_a_search_with_replay_equals_one_without(setting):
    from loramerge_cli.search.enmp import EnmpSearch, EnmpSettings

    results = []
    for block_cache_mb in (1024.0, 0.0):
        fitness = fitness_for(setting, block_cache_mb=block_cache_mb)
        assert fitness.replay.enabled == (block_cache_mb > 0)
        search = EnmpSearch(EnmpSettings(popsize=6, generations=3, max_prune=0.5, seed=2), LAYERS,
                            len(fitness.adapters), fitness)
        best = search.run()
        results.append((best.pruned, best.fitness, fitness.reference,
                        sorted((key, value.fitness) for key, value in search.state.memo.items())))
    assert results[0] == results[1]


def test_a_small_budget_keeps_every_second_block_and_stays_exact(setting):
    full = fitness_for(setting)
    per_block = sum(o.numel() * o.element_size() for per_task in full.replay.outputs[0].values() for o in per_task)
    budget_mb = (2.5 * per_block) / 2**20  # four blocks overflow it; every second block (two) fits
    fitness = fitness_for(setting, block_cache_mb=budget_mb)
    kept = sorted(fitness.replay.outputs)
    assert kept == [1, 3]  # the deepest block of each stride of 2
    task_count = len(fitness.adapters)
    for pruned in [(task_count * 3,), (task_count * 2,), (task_count,)]:  # first changed: 3, 2, 1
        deltas = fitness.candidate_deltas(pruned, None)
        assert fitness.replay.evaluate(deltas) == fitness.engine.evaluate(deltas)
    assert fitness.replay.replayed_blocks == 2 + 2 + 0  # blocks 0–1 replayed for firsts 3 and 2; none for 1


def test_adapter_scope_and_a_new_lambda_change_every_block(setting):
    fitness = fitness_for(setting)
    task_count = len(fitness.adapters)
    assert fitness.replay.first_changed(fitness.candidate_deltas((task_count * 3,), 0.7)) == 0  # another λ
    adapter_scope = fitness_for(setting, merger="magnitude")
    adapter_scope.unit_settings.params["scope"] = "adapter"
    adapter_scope.cache = None
    deltas = adapter_scope.candidate_deltas((task_count * 3,), None)  # global trimming: every block may change
    assert adapter_scope.replay.evaluate(deltas) == adapter_scope.engine.evaluate(deltas)


def test_find_blocks_and_same_delta():
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])
    model.head = torch.nn.Linear(2, 2)
    blocks, index_of = find_blocks(model, ["layers.0", "layers.2"])
    assert blocks is model.layers and index_of == {"layers.0": 0, "layers.2": 2}
    assert find_blocks(model, ["layers.0", "head"]) is None  # a module outside the blocks
    assert find_blocks(model, ["layers.7"]) is None
    left, right = torch.randn(3, 2), torch.randn(2, 4)
    assert same_delta(Delta(left, right), Delta(left.clone(), right.clone()))
    assert not same_delta(Delta(left, right), Delta(left * 2, right))
    assert not same_delta(Delta(left, right), None) and same_delta(None, None)


def test_no_budget_and_modules_outside_one_block_list_turn_it_off(setting):
    fitness = fitness_for(setting, block_cache_mb=0)
    assert not fitness.replay.enabled
    deltas = fitness.candidate_deltas((3,), None)
    assert fitness.replay.evaluate(deltas) == fitness.engine.evaluate(deltas)
    model = fitness.engine.model
    assert BlockReplay(fitness.engine, [*module_paths(fitness.adapters), "score"], 1024).enabled is False
    assert model is fitness.engine.model


def test_gpt2_causal_lm_choice_scores_are_identical_with_replay(tmp_path):
    from eval_fixtures import build_gpt2_lm, save_peft_adapter, text_rows, write_jsonl, write_tasks_file

    from loramerge_cli.adapters.peft_reader import load_adapters
    from loramerge_cli.evaluation.engine import merged_deltas
    from loramerge_cli.merging.merge import merge, run_merge
    from loramerge_cli.search.fitness import pruned_table

    base = build_gpt2_lm(tmp_path / "gpt2")
    folders = {name: save_peft_adapter(base, tmp_path / name, ["c_attn", "c_proj"], "GPT2LMHeadModel", "CAUSAL_LM",
                                       seed=seed, fan_in_fan_out=True)
               for name, seed in (("wiki", 1), ("code", 2))}
    tasks = []
    for name in folders:
        rows = [{**row, "answer": ["yes", "no"][row["label"]]} for row in text_rows(7, seed=len(name), num_labels=2)]
        tasks.append({"name": name, "data": {"validation": str(write_jsonl(tmp_path / f"{name}.jsonl", rows))},
                      "prompt": "{premise} ? {hypothesis} :", "choices": [" yes", " no w1"], "label": "answer",
                      "labels": ["yes", "no"]})
    tasks_file = write_tasks_file(tmp_path / "tasks.yaml", {"base_model": str(base), "model_type": "causal-lm",
                                                            "tasks": tasks})
    adapters = load_adapters([f"{name}={folder}" for name, folder in folders.items()])
    engine = Evaluator(load_task_file(tasks_file), adapters, EvalSettings(threads=1, batch_size=4))
    replay = BlockReplay(engine, module_paths(adapters), 1024)
    assert replay.enabled and len(replay.blocks) == 2  # transformer.h
    replay.record(merged_deltas(merge(adapters, MergeConfig(merger="ta"))))
    settings = resolve_config(MergeConfig(merger="ta"), len(adapters))
    pruned = run_merge(adapters, settings, pruned_table(ones_table(adapters), (2,)))  # block 1, task wiki
    deltas = merged_deltas(pruned)
    assert replay.first_changed(deltas) == 1
    for task in engine.task_file.names:
        with engine.apply(deltas):
            full = engine.scores(task)
            with replay._standing_in(0, task):
                replayed = engine.scores(task)
        assert torch.equal(full, replayed)
    assert replay.evaluate(deltas) == engine.evaluate(deltas) and replay.verified


def test_replay_that_switches_itself_off_lets_its_recorded_outputs_go(setting, monkeypatch):
    """When the first replayed candidate's scores differ from a full forward, replay is switched off for the
    run; the recorded block outputs (up to --block-cache-mb, on the device) were kept all the same."""
    fitness = fitness_for(setting)
    replay, engine = fitness.replay, fitness.engine
    full = engine.evaluate

    def evaluate(deltas, around_task=None):
        scores = full(deltas, around_task=around_task) if around_task else full(deltas)
        return {task: value + 1.0 for task, value in scores.items()} if around_task else scores

    monkeypatch.setattr(engine, "evaluate", evaluate)
    deltas = fitness.candidate_deltas((len(fitness.adapters) * 3,), None)
    assert replay.outputs and replay.evaluate(deltas) == full(deltas)
    assert not replay.enabled and replay.outputs == {}
