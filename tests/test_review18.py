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
