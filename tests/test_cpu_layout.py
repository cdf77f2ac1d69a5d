"""The CPU layout step: the matmul path per row count is measured once per machine and model shape, cached,
and a damaged cache is measured again."""

import json

import pytest

from eagle3.runtimes import cpu_layout
from eagle3.runtimes.cpu_layout import BUCKETS, PATHS, add_few_row_copies, measured_paths, paths_by_row_count
from eagle3.runtimes.model import load_model
from eagle3.runtimes.norm_folding import fold_norms


@pytest.fixture
def model(stories_path):
    return add_few_row_copies(fold_norms(load_model(stories_path, device="cpu")))


def test_a_row_count_takes_the_next_buckets_path():
    best = {rows: PATHS[i % 3] for i, rows in enumerate(BUCKETS)}
    paths = paths_by_row_count(best)
    assert len(paths) == 65 and paths[1] == "x @ W"
    assert paths[2] == best[2] and paths[5] == best[6] and paths[13] == best[16] and paths[64] == best[64]


def test_the_choice_is_measured_once_and_cached(model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EAGLE3_HOME", str(tmp_path))
    first = measured_paths(model)
    assert set(first[2:]) <= set(PATHS) and "measuring" in capsys.readouterr().err
    files = list((tmp_path / "layout").glob("*.json"))
    assert len(files) == 1

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again although cached")

    monkeypatch.setattr(cpu_layout, "measure_paths", no_measuring)
    assert measured_paths(model) == first


@pytest.mark.parametrize("damage", ["{not json", json.dumps({"2": "x @ W"}), json.dumps({str(r): "gemv" for r in BUCKETS})])
def test_a_damaged_cache_is_measured_again(model, tmp_path, monkeypatch, capsys, damage):
    monkeypatch.setenv("EAGLE3_HOME", str(tmp_path))
    measured_paths(model)
    (cache,) = (tmp_path / "layout").glob("*.json")
    cache.write_text(damage)
    capsys.readouterr()
    paths = measured_paths(model)
    err = capsys.readouterr().err
    assert "unreadable" in err and "measuring" in err and set(paths[2:]) <= set(PATHS)
    assert set(json.loads(cache.read_text()).values()) <= set(PATHS)  # rewritten whole
