"""Defects found or left open by the review round of 2026-12-07 (night); each test fails on the code before its
fix."""
from __future__ import annotations

import multiprocessing
from pathlib import Path


def _put_many(run_dir: str, worker: int, count: int) -> None:
    from loramerge_cli.evaluation.cache import ScoreCache

    cache = ScoreCache(run_dir)
    for index in range(count):
        cache.put({f"{worker:02x}{index:062x}": 0.5})


def test_two_commands_sharing_a_score_cache_lose_no_score(tmp_path):
    # two processes re-read and replace scores.json: without a lock, one's rename drops what the other just wrote
    from loramerge_cli.evaluation.cache import read_cache

    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_put_many, args=(str(tmp_path), worker, 150)) for worker in range(3)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(120)
        assert process.exitcode == 0
    assert len(read_cache(Path(tmp_path) / "scores.json")) == 3 * 150
