"""Review of session 18: each test failed before its fix."""

import pytest
from factories import invoke_cli
from test_hostile_inputs import one_line

from loramerge_cli import api
from loramerge_cli.errors import LoramergeError


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    from eval_fixtures import build_text_setting

    return build_text_setting(tmp_path_factory.mktemp("review18"))


def test_a_token_cap_above_the_model_s_positions_is_refused_by_every_plan(setting, tmp_path):
    """`--max-length 100000` on a 64-position model was refused once the engine read the base's config (after
    torch, the adapters and, for search-mask, the whole plan and its run directory). The base's config.json is
    read by the plans now: eval, merge (--lambda auto / RegMean), search-mask and the library's plans."""
    import json

    from loramerge_cli.search.plan import SearchRequest

    positions = json.loads((setting.base / "config.json").read_text())["max_position_embeddings"]
    adapters = setting.adapter_args()
    settings = api.EvalSettings(max_length=positions + 1, threads=1)
    words = f"--max-length {positions + 1} is more than the model's {positions} positions"
    with pytest.raises(LoramergeError, match=words):
        api.plan_eval(setting.tasks_file, adapters, settings=settings)
    with pytest.raises(LoramergeError, match=words):
        api.plan_search(SearchRequest(strategy="greedy", adapters=adapters, merge=api.MergeConfig(merger="ta"),
                                      tasks=setting.tasks_file, eval=settings), out=tmp_path / "mask.json")
    loaded = api.load_adapters(adapters)
    with pytest.raises(LoramergeError, match=words):
        api.plan_merge(loaded, api.MergeConfig(merger="ta", lam="auto"), out=tmp_path / "merged",
                       tuning=api.TaskData(setting.tasks_file, max_length=positions + 1))
    with pytest.raises(LoramergeError, match=words):
        api.evaluate(setting.tasks_file, loaded, settings=settings)
    for command in (["eval"], ["merge", "--lambda", "auto", "--out", tmp_path / "m"],
                    ["search-mask", "--out", tmp_path / "t.json"]):
        one_line(invoke_cli([*command, "--tasks", setting.tasks_file, "--adapters", *adapters, "--max-length",
                             str(positions + 1)]), "positions")
    content = setting.tasks_file.read_text().replace("num_labels: 3\n",
                                                     f"num_labels: 3\n  max_length: {positions * 2}\n", 1)
    spec = tmp_path / "capped.yaml"
    spec.write_text(content)
    one_line(invoke_cli(["eval", "--tasks", spec, "--adapters", *adapters]), f"its max_length {positions * 2}")
    api.plan_eval(setting.tasks_file, adapters, settings=api.EvalSettings(max_length=positions))  # the limit itself


def test_a_spec_of_another_model_type_than_the_adapters_is_refused_before_the_model_loads(setting, tmp_path):
    """A causal-LM spec scored with sequence-classification adapters failed after the base loaded, on the head
    ("score.weight is not a parameter of the base model"); the adapters' PEFT task_type says it first."""
    import yaml

    content = yaml.safe_load(setting.tasks_file.read_text())
    content["model_type"] = "causal-lm"
    for task in content["tasks"]:
        for key in ("head", "num_labels", "masked_labels"):
            task.pop(key, None)
        task["prompt"] = task.pop("text")[0]
        task["choices"] = ["yes", "maybe", "no"]
    spec = tmp_path / "causal.yaml"
    spec.write_text(yaml.safe_dump(content))
    with pytest.raises(LoramergeError, match="model_type causal-lm, but adapter 'alpha' was trained for SEQ_CLS"):
        api.plan_eval(spec, setting.adapter_args())
    one_line(invoke_cli(["eval", "--tasks", spec, "--adapters", *setting.adapter_args()]), "trained for SEQ_CLS")


def _one_module_adapter(name: str, B, A):
    from dataclasses import replace

    from factories import random_adapter

    from loramerge_cli.adapters.model import LoraModule

    adapter = random_adapter(name, {PATH: (B.shape[0], A.shape[1])}, rank=B.shape[1], seed=1)
    return replace(adapter, modules={PATH: LoraModule(PATH, A, B, scale=1.0, alpha=float(B.shape[1]))})


PATH = "model.layers.0.self_attn.q_proj"


def _update(result):
    module = result.modules[PATH]
    return module.lora_B @ module.lora_A


@pytest.mark.parametrize("merger,space", [("knots", "knots"), ("ties", "knots"), ("tsv", "knots"), ("ties", "core"),
                                          ("ties", "full"), ("tsv", "full")])
def test_an_adapter_whose_update_is_zero_leaves_the_module_as_a_weight_of_zero_does(merger, space):
    """An adapter with lora_B = 0 in a module (an untrained module) changed the merge of the others: in the knots
    space its V_t block is rounding noise (1e-16) that TIES counted as votes (halving the disjoint mean: 0.38
    off) and TSV as a direction (0.8 off); in the core space its lora_A turned the basis; a full-space dense
    result's rank cap counted its rank. It now leaves as a weight of 0 does."""
    import torch

    from dense_reference import reference_merge

    generator = torch.Generator().manual_seed(5)
    A_a, A_b = (torch.randn(2, 6, generator=generator, dtype=torch.float64) for _ in range(2))
    B_b = torch.randn(8, 2, generator=generator, dtype=torch.float64)
    zero = _one_module_adapter("a", torch.zeros(8, 2, dtype=torch.float64), A_a)
    other = _one_module_adapter("b", B_b, A_b)
    config = api.MergeConfig(merger=merger, space=space, lam=1.0)
    with_zero = _update(api.merge([zero, other], config))
    alone = _update(api.merge([zero, other], api.MergeConfig(merger=merger, space=space, lam=1.0, weights=[0, 1])))
    assert torch.allclose(with_zero, alone, rtol=0, atol=1e-12)
    if space != "full":  # (the full space's dense result is truncated by the writer's rule, not the reference's)
        method = "ties" if merger == "knots" else merger
        density = 0.9 if merger == "knots" else 0.8 if merger == "ties" else 1.0
        reference = reference_merge([zero, other], method, space, density=density)[PATH]
        assert torch.allclose(with_zero, reference, rtol=0, atol=1e-10)


def test_tsv_depends_on_the_updates_only_not_on_how_their_factors_are_written():
    """TSV cut each task's singular directions at k_t when they overflow the space; in the unscaled knots space
    the singular values of V_t tie at 1 for every direction only task t spans, and a cut through tied values
    kept whichever directions the SVD returned: writing the same ΔW_t as (B Q)(Qᵀ A) moved the merge by 15 to
    45 %. The cut now keeps tied values together."""
    import torch

    from dense_reference import reference_merge

    generator = torch.Generator().manual_seed(3)
    basis = torch.eye(8, dtype=torch.float64)
    spans = [basis[:, :3], basis[:, 3:6], torch.stack([basis[:, 3] + basis[:, 6], basis[:, 7], basis[:, 6]], 1)]
    factors = [(span @ torch.randn(3, 3, generator=generator, dtype=torch.float64),
                torch.randn(3, 10, generator=generator, dtype=torch.float64)) for span in spans]
    config = api.MergeConfig(merger="tsv", space="knots", lam=1.0)

    def merged(rotation_seed):
        adapters = []
        for name, (B, A) in zip("abc", factors):
            if rotation_seed is not None:
                rotation = torch.Generator().manual_seed(rotation_seed + ord(name))
                Q, _ = torch.linalg.qr(torch.randn(3, 3, generator=rotation, dtype=torch.float64))
                B, A = B @ Q, Q.T @ A
            adapters.append(_one_module_adapter(name, B, A))
        return adapters, _update(api.merge(adapters, config))

    adapters, written = merged(None)
    for seed in range(4):
        assert torch.allclose(merged(seed)[1], written, rtol=0, atol=1e-12)
    reference = reference_merge(adapters, "tsv", "knots")[PATH]
    assert torch.allclose(written, reference, rtol=0, atol=1e-10)


@pytest.mark.parametrize("merger,options", [("cart", {"rank_fraction": 0.1, "cart_scale": 0.4}),
                                            ("iso_cts", {"common_fraction": 0.3})])
def test_cart_and_iso_cts_cut_no_tied_singular_values(merger, options):
    """CART keeps k leading directions of each X_t − mean, Iso-CTS k of Σ_t X_t: with tasks of orthonormal
    factors on orthogonal subspaces those singular values tie, and the cut kept whichever the SVD of the
    factors returned (the merge moved with a rotation Q of the factors, (B Q)(Qᵀ A)). Tied values are kept
    together now."""
    import torch

    from dense_reference import reference_merge

    generator = torch.Generator().manual_seed(11)
    left, _ = torch.linalg.qr(torch.randn(12, 9, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(12, 9, generator=generator, dtype=torch.float64))
    config = api.MergeConfig(merger=merger, lam=1.0, params=options)

    def merged(rotation_seed):
        adapters = []
        for index, name in enumerate("abc"):
            B, A = left[:, 3 * index:3 * index + 3], right[:, 3 * index:3 * index + 3].T
            if rotation_seed is not None:
                rotation = torch.Generator().manual_seed(rotation_seed + index)
                Q, _ = torch.linalg.qr(torch.randn(3, 3, generator=rotation, dtype=torch.float64))
                B, A = B @ Q, Q.T @ A
            adapters.append(_one_module_adapter(name, B.contiguous(), A.contiguous()))
        return adapters, _update(api.merge(adapters, config))

    adapters, written = merged(None)
    for seed in range(4):
        assert torch.allclose(merged(seed)[1], written, rtol=0, atol=1e-12)
    assert torch.allclose(written, reference_merge(adapters, merger, **options)[PATH], rtol=0, atol=1e-10)
