"""The benchmark times parsing in a cache of its own and leaves the caller's settings as found."""

from __future__ import annotations

import os

import pytest

from pipeline.bench import run_bench


def test_bench_times_a_cold_parse_then_a_cache_hit_in_a_cache_of_its_own(kaggle_csv, tmp_path):
    # Catches a bench that times two parses (no hit), one that reads the user's cache (a warm
    # "parse"), and one that writes there or leaves the setting changed.
    from pipeline import data as fer

    mine = str(tmp_path / "my-cache")
    os.environ["FER_CACHE_DIR"] = mine  # the isolated fixture restores it after the test
    fer.load(kaggle_csv)  # the user's cache already holds this file
    before = sorted(os.listdir(mine))
    out = run_bench(str(kaggle_csv), {}, 0.05, [])
    assert out["rows"] == 7 * 15 and out["cache_hit"] is True
    assert os.environ["FER_CACHE_DIR"] == mine and sorted(os.listdir(mine)) == before


@pytest.mark.slow
def test_bench_concurrent_measures_each_k_and_prints_its_table(tmp_path, kaggle_csv):
    import json
    import re

    from tests.conftest import run_cli

    # No stage of its own to time: --concurrent measures the reference stage alone.
    # Small batches and a small file: a measurement of seconds, not a benchmark.
    args = ["--stages", "", "--set", "width=0.125", "--set", "batch_size=16", "--seconds",
            "0.3", "--model-uri", "", "--concurrent", "1,2", "--data", str(kaggle_csv)]
    r = run_cli("pipeline.bench", *args, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])["concurrent"]
    assert list(got) == ["1", "2"]
    for k, row in got.items():
        assert row["img_per_s"] > 0
        # On a CPU the cores are divided between the runs trained at once.
        assert row["threads_per_slot"] == max(1, len(os.sched_getaffinity(0)) // int(k))
    assert got["1"]["speedup"] == 1.0
    assert got["2"]["speedup"] == round(got["2"]["img_per_s"] / got["1"]["img_per_s"], 2)
    table = run_cli("pipeline.bench", *args, cwd=tmp_path)
    assert table.returncode == 0, table.stderr[-2000:]
    assert re.search(r"^\s+2\s+[\d,]+\s+[\d,]+\s+[\d.]+x\s+\d+\s+-$", table.stdout, re.M), \
        table.stdout


@pytest.mark.slow
def test_bench_concurrent_refuses_a_k_below_one(tmp_path):
    from tests.conftest import run_cli

    r = run_cli("pipeline.bench", "--stages", "", "--model-uri", "", "--concurrent", "1,0",
                cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: --concurrent 1,0: '0': expected a whole number from 1 to 2147483647, got '0'; "
        "give them separated by commas, e.g. 1,2,4,8."]
