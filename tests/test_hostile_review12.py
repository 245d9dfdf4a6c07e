"""Findings of the twelfth round of reviews (code health, search scaling, device paths): each test fails on
the code before its fix."""

from __future__ import annotations

import pytest
from test_hostile_review7 import _request, setting  # noqa: F401  (the fixture)

from loramerge_cli.errors import UsageError
from loramerge_cli.merging.config import MergeConfig
from loramerge_cli.search.plan import plan_search


@pytest.mark.parametrize("merge, message", [
    (MergeConfig(merger="ties", density=1.5), "--density must be <= 1"),
    (MergeConfig(merger="ta", params={"gamma": 0.1}), "--gamma does not apply to method ta"),
    (MergeConfig(merger="della", density=0.1, params={"epsilon": 0.9}), "DELLA's keep probabilities"),
    (MergeConfig(merger="ta", weights=[1.0] * 7), "--weights has 7 values for"),
    (MergeConfig(merger="ta", lam=float("nan")), "--lambda must be a finite number"),
    (MergeConfig(merger="lora_lego", space="core"), "works in the full space only"),
])
def test_plan_search_refuses_merger_settings_before_the_adapters_load(setting, merge, message):
    """`api.plan_search` planned each of these, and the search refused them only once it had loaded the
    adapters (the command line's flags were checked there too)."""
    with pytest.raises(UsageError, match=message):
        plan_search(_request(setting, merge=merge))
