"""The benchmark times parsing in a cache of its own and leaves the caller's settings as found."""

from __future__ import annotations

import os

from pipeline.bench import run_bench


def test_bench_times_a_cold_and_a_cached_load_and_gives_back_the_cache_setting(kaggle_csv,
                                                                                tmp_path):
    mine = str(tmp_path / "my-cache")
    os.environ["FER_CACHE_DIR"] = mine  # the isolated fixture restores it after the test
    out = run_bench(str(kaggle_csv), {}, 0.05, [])
    assert out["rows"] == 7 * 15 and out["parse_seconds"] >= 0 and out["cached_load_seconds"] >= 0
    assert os.environ["FER_CACHE_DIR"] == mine
    assert not os.path.exists(mine)  # the bench parsed into its own, temporary cache
