"""pyddl.torch.elastic without ranks: the sampler's shards before and after a resize, and
ObjectState's commit / restore / commit file (issue 19 point 5)."""

import os

import pytest

from pyddl.config import PYDDL_COMMIT_DIR
from pyddl.launch.config import RunConfig, parse_rdzv_conf
from pyddl.torch.elastic import ObjectState
from pyddl.torch.elastic.sampler import shard


@pytest.mark.parametrize("n,size", [(10, 3), (48, 2), (7, 4), (5, 5)])
def test_shards_cover_the_epoch_evenly(n, size):
    shards = [shard(n, 0, epoch=1, seed=3, shuffle=True, rank=r, size=size) for r in range(size)]
    assert len({len(s) for s in shards}) == 1
    assert sorted(set().union(*shards)) == list(range(n))
    assert sum(map(len, shards)) - n < size  # padding repeats fewer than `size` samples


def test_a_resize_reshards_only_what_the_epoch_has_left():
    n, seed, epoch = 48, 7, 2
    # 3 workers did 4 batches of 2: 24 samples are done; 2 workers share the other 24.
    before = [shard(n, 0, epoch, seed, True, r, 3) for r in range(3)]
    done = {i for s in before for i in s[:8]}
    after = [shard(n, 24, epoch, seed, True, r, 2) for r in range(2)]
    assert [len(s) for s in after] == [12, 12]
    assert set().union(*after) == set(range(n)) - done


def test_the_order_is_the_seeds_and_the_epochs():
    assert shard(10, 0, 0, 0, False, 0, 1) == list(range(10))
    assert shard(10, 0, 1, 5, True, 0, 1) == shard(10, 0, 0, 6, True, 0, 1)
    assert shard(10, 0, 1, 5, True, 0, 1) != shard(10, 0, 2, 5, True, 0, 1)


def _state(tmp_path, monkeypatch, **attrs):
    folder = tmp_path / "commits"
    monkeypatch.setenv(PYDDL_COMMIT_DIR, str(folder))
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    return ObjectState(bcast_object=lambda obj, root: obj, get_rank=lambda: 0, **attrs)


def test_restore_undoes_what_changed_since_the_commit(tmp_path, monkeypatch):
    state = _state(tmp_path, monkeypatch, epoch=0, seen=[])
    state.epoch, state.seen = 2, [1]
    state.commit()
    state.epoch = 3
    state.seen.append(2)  # a mutation in place is undone too: commits are copies
    state.restore()
    assert (state.epoch, state.seen, state.commits) == (2, [1], 1)


def test_a_restarted_worker_finds_its_servers_newest_commit(tmp_path, monkeypatch):
    state = _state(tmp_path, monkeypatch, epoch=0)
    for epoch in (1, 2):
        state.epoch = epoch
        state.commit()
    assert sorted(os.listdir(tmp_path / "commits")) == ["state.pt"]  # no partial file left
    fresh = _state(tmp_path, monkeypatch, epoch=0)  # the restarted process
    assert fresh.load_commit() == dict(commits=2, size=3)
    fresh.restore()
    assert (fresh.epoch, fresh.commits) == (2, 2)
    assert fresh.load_commit() is None  # not newer than what it holds


def test_only_local_rank_0_writes_and_nothing_without_the_folder(tmp_path, monkeypatch):
    state = _state(tmp_path, monkeypatch, epoch=0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    state.commit()
    monkeypatch.delenv(PYDDL_COMMIT_DIR)
    monkeypatch.setenv("LOCAL_RANK", "0")
    state.commit()
    assert not (tmp_path / "commits").exists() and state.commits == 2


def test_a_commit_folder_others_may_write_is_refused(tmp_path, monkeypatch):
    state = _state(tmp_path, monkeypatch, epoch=0)
    state.commit()
    os.chmod(tmp_path / "commits", 0o777)
    with pytest.raises(PermissionError, match="not a private folder"):
        _state(tmp_path, monkeypatch, epoch=0).load_commit()


def test_rdzv_conf():
    assert parse_rdzv_conf("last_call_timeout=2, keep_alive_interval=1") == (
        ("last_call_timeout", 2), ("keep_alive_interval", 1))
    with pytest.raises(ValueError, match="KEY=N"):
        parse_rdzv_conf("last_call=2")
    with pytest.raises(ValueError, match="add --nnodes MIN:MAX"):
        RunConfig(nproc=1, command=("x.py",), rdzv_conf=(("last_call_timeout", 2),))
