"""A sixth hostile review (of main at b04fd6f): the nested successive halving (`NestedLadder`), the counts of
forward examples and passes, and `search-mask --screen-rungs`. One test per defect, each failing on that
commit; each docstring says what the user did, what happened and what should happen."""

from __future__ import annotations

import io
import json
import re

import pytest
from eval_fixtures import build_text_setting
from factories import invoke_cli
from test_screened_search import GAINS, table_ladder

from loramerge_cli.errors import UsageError
from loramerge_cli.evaluation.engine import EvalSettings
from loramerge_cli.merging.merge import MergeConfig
from loramerge_cli.search.enmp import EnmpSettings
from loramerge_cli.search.screened import ScreenedSearch, ScreenedSettings


@pytest.fixture(scope="module")
def setting80(tmp_path_factory):
    """80 validation examples per task: the halving's subsets are 27 and 80 (⌈80/9⌉ = 9 < 24 is dropped)."""
    return build_text_setting(tmp_path_factory.mktemp("review6"), rows=80)


def _search_args(setting, out, *extra):
    return ["search-mask", "--strategy", "screened",
            "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file, "--merger", "ties",
            "--popsize", "4", "--generations", "2", "--max-prune", "0.5", "--threads", "1", "--seed", "3",
            "--out", out, "--force", *extra]


# --- progress ---------------------------------------------------------------------------------------------

def test_the_screen_line_counts_the_tables_it_scored_not_their_promotions():
    """`search-mask --screen-rungs 3` (4 units × 3 tasks): the screen's summary line says "screen: 34 tables
    scored (10 on the full set)" when it scored the 12 single-unit tables (each on the smallest subset, the
    best promoted on): the line prints the record's `new_evaluations`, which counts every promotion of a
    table as one more evaluation (12 + 12 + 10 here; on the real text setting "9 tables scored" for 6).
    With the exact screen (`--screen-rungs 1`) the two agree, so the number
    jumps by the promotions only when the screen is halved. The line should count the distinct tables
    scored (or say "evaluations")."""
    from rich.console import Console

    from loramerge_cli.cli.render import search_progress

    events = []
    search = ScreenedSearch(ScreenedSettings(popsize=6, generations=1, seed=1, max_prune=0.25, screen_rungs=3), 4,
                            3, table_ladder(GAINS), on_event=lambda kind, data: events.append((kind, data)))
    search.start()
    search.step()  # the screen
    [record] = [data for kind, data in events if kind == "screen"]
    tables = {candidate for rung in search.levels for candidate in search.state.scores[rung] if candidate[0]}
    console = Console(file=io.StringIO(), width=200)
    search_progress(console, 1)("screen", record)
    line = console.file.getvalue()
    shown = int(re.search(r"screen: (\d+) tables scored", line).group(1))
    assert shown == len(tables), f"{line.strip()!r}: {len(tables)} distinct tables were scored"


# --- options ----------------------------------------------------------------------------------------------

def test_screen_rungs_beyond_the_rungs_the_validation_set_has_is_not_silent(setting80, tmp_path):
    """`search-mask --screen-rungs 3` on 80 validation examples per task: the help promises "3: from
    n/eta²", but subsets under 24 examples are dropped, so the search has two rungs (27 and 80) and the
    screen is halved over those two only: exit 0, no word, the run is `--screen-rungs 2`'s to the last
    forward example, and the provenance records `screen_rungs: 3` (on 24 examples per task halving is off
    altogether and `--screen-rungs 3` does nothing at all). `--screen-rungs` with a label-free fitness,
    where it would do nothing either, is a usage error (CHANGELOG). Asking for more screen rungs than the
    validation set gives should be refused in one line, or at least said (a warning naming
    `--screen-rungs`) and recorded as the rungs actually used."""
    three, two = tmp_path / "three.json", tmp_path / "two.json"
    result = invoke_cli(_search_args(setting80, three, "--screen-rungs", "3"))
    if result.exit_code == 0:
        invoke_cli(_search_args(setting80, two, "--screen-rungs", "2"))
        ran = [json.loads(path.read_text())["provenance"] for path in (three, two)]
        per_rung = [[h["evaluations_per_rung"] for h in run["history"]] for run in ran]
        same = ran[0]["forward_examples"] == ran[1]["forward_examples"] and per_rung[0] == per_rung[1]
        assert "--screen-rungs" in result.stderr, (
            f"exit 0 without a word; same run as --screen-rungs 2: {same}; provenance screen_rungs "
            f"{ran[0]['search']['screen_rungs']}")
    else:
        assert result.exit_code in (1, 2) and len(result.stderr.strip().splitlines()) == 1
        assert "--screen-rungs" in result.stderr


def test_the_python_api_refuses_screen_rungs_with_halving_off(setting80, tmp_path):
    """`api.plan_search(api.SearchRequest(strategy="screened", ..., options={"screen_rungs": 3, "halving": False}))` and
    `api.search(plan)`: accepted, the screen runs on the full set only and the provenance records
    `screen_rungs: 3` beside `halving: false`. The same settings on the command line (`--screen-rungs 3
    --no-halving`) are a usage error (exit 2, "does nothing with --no-halving"), and the README says the
    API does what `search-mask` does; the check lives only in the CLI's flag parser (`needs`), while the
    label-free-fitness check is in the strategy's own check and so covers both. `plan_search` should raise
    the same UsageError."""
    from loramerge_cli import api

    request = api.SearchRequest(strategy="screened",
                                adapters=setting80.adapter_args(), merge=MergeConfig(merger="ties"),
                                tasks=setting80.tasks_file, eval=EvalSettings(threads=1),
                                enmp=EnmpSettings(popsize=4, generations=1, max_prune=0.5, seed=3),
                                options={"screen_rungs": 3, "halving": False})
    cli = invoke_cli(_search_args(setting80, tmp_path / "cli.json", "--screen-rungs", "3", "--no-halving"))
    assert cli.exit_code == 2  # the command line refuses it
    with pytest.raises(UsageError, match="screen-rungs"):
        api.search(api.plan_search(request, out=tmp_path / "api.json"))
