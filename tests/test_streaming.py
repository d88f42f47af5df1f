"""core.stream's training stream: rank/worker splitting, epochs, exact resume (tiny shards written here; what it
skips and why is in test_bad_samples.py)."""
import collections
import itertools
import json

import pytest
import torch

from core.errors import ConfigError
from tests.helpers import good_sample, keys_of, stream, write_shard



def shard_set(tmp_path, shards, per_shard):
    return [write_shard(tmp_path / f"train-{s:06d}.tar",
                        [good_sample(f"s{s}_{i}", 9 * i) for i in range(per_shard)]) for s in range(shards)]




# ---- splitting over ranks and workers

@pytest.mark.parametrize("shards, per_shard", [(6, 5), (3, 7)], ids=["more-shards-than-slots", "fewer-shards"])
def test_one_epoch_reads_every_sample_once_over_2_ranks_x_2_workers(tmp_path, monkeypatch, shards, per_shard):
    paths = shard_set(tmp_path, shards, per_shard)
    seen = collections.Counter()
    for rank in range(2):
        seen.update(keys_of(stream(paths, num_workers=2, rank=rank, world_size=2, epochs=1, seed=5)))
    assert seen == {f"s{s}_{i}": 1 for s in range(shards) for i in range(per_shard)}
    monkeypatch.setenv("RANK", "1")  # no explicit rank: torch.distributed is not initialised, so the environment
    monkeypatch.setenv("WORLD_SIZE", "2")
    rank1 = keys_of(stream(paths, num_workers=0, epochs=1, seed=5))
    assert rank1 == keys_of(stream(paths, num_workers=0, epochs=1, seed=5, rank=1, world_size=2))
    assert not set(rank1) & set(keys_of(stream(paths, num_workers=0, epochs=1, seed=5, rank=0)))


def test_environment_rank_errors_name_the_variable(tmp_path, monkeypatch):
    paths = shard_set(tmp_path, 1, 2)
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ConfigError, match="RANK='one'"):
        stream(paths)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="rank 2 is outside world size 2"):
        stream(paths)


def test_epochs_reshuffle_and_resample_is_deterministic(tmp_path):
    paths = shard_set(tmp_path, 4, 4)
    two = keys_of(stream(paths, epochs=2))
    assert sorted(two[:16]) == sorted(two[16:]) and two[:16] != two[16:]
    a = keys_of(itertools.islice(stream(paths, resample=True), 12))
    assert a == keys_of(itertools.islice(stream(paths, resample=True), 12))
    assert a != keys_of(itertools.islice(stream(paths, resample=True, seed=1), 12))
    assert set(a) <= {f"s{s}_{i}" for s in range(4) for i in range(4)}


# ---- position

@pytest.mark.parametrize("workers, taken", [(0, 7), (2, 9)])
def test_resume_continues_exactly(tmp_path, workers, taken):
    paths = shard_set(tmp_path, 4, 10)
    paths.append(write_shard(tmp_path / "train-000004.tar", [
        good_sample("t0"), {"__key__": "t1", "png": b"x", "txt": b"x"}, good_sample("t2"), good_sample("t3")]))
    more = 12  # 44 samples over 2 workers: the resumed part crosses an epoch boundary
    reference = stream(paths, num_workers=workers)
    expected = list(itertools.islice(reference, taken + more))
    first = stream(paths, num_workers=workers)
    assert keys_of(itertools.islice(first, taken)) == keys_of(expected[:taken])
    state = json.loads(json.dumps(first.state_dict()))  # JSON-able; workers have prefetched beyond it
    first.close()
    resumed = stream(paths, num_workers=workers)
    resumed.load_state_dict(state)
    got = list(itertools.islice(resumed, more))
    assert keys_of(got) == keys_of(expected[taken:])
    assert all(torch.equal(a[k], b[k]) for a, b in zip(got, expected[taken:])
               for k in ("pixel_values", "input_ids", "targets"))
    assert resumed.report() == reference.report() and set(reference.report()) == {"bad_image"}  # not re-counted
    for it in (reference, resumed):
        it.close()
    with pytest.raises(ConfigError, match="num_workers"):
        stream(paths, num_workers=workers + 1).load_state_dict(state)
    with pytest.raises(ConfigError, match="seed"):
        stream(paths, num_workers=workers, seed=3).load_state_dict(state)
