"""Only data errors become bad samples: other errors stop the rank, transient read errors are retried."""

from __future__ import annotations

import errno
import os

import pytest
from conftest import image_bytes, write_layout

import distrain.data.stream as stream_mod
from distrain.data import decode
from distrain.data.decode import DecodeError, eval_sample
from distrain.data.remote import open_shard
from distrain.data.shards import reads_for_range, resolve_shards
from distrain.data.stream import Augment, ShardStream, StreamError, make_loader, read_samples

AUG = Augment(size=8, scale=(0.5, 1.0), ratio=(0.75, 1.33), hflip=True)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """16 good samples in 2 shards of 8."""
    return resolve_shards(str(write_layout(tmp_path_factory.mktemp("set") / "set", [8, 8])))


@pytest.fixture
def no_wait(monkeypatch):
    monkeypatch.setattr(stream_mod, "RETRY_DELAY_S", 0.0)


def all_samples(shards) -> list:
    return list(read_samples(reads_for_range(list(shards.shards), 0, shards.total), num_classes=4))


def batches(shards, workers: int) -> list[dict]:
    s = ShardStream(shards, rank=0, world_size=1, batch_size=4, seed=0, num_classes=4, augment=AUG,
                    batches_per_epoch=4, shuffle_block=4)
    return list(make_loader(s, workers, prefetch=2, pin_memory=False))


def failing_open(monkeypatch, url: str, error: OSError, times: int | None = None) -> list[str]:
    """Make opening ``url`` raise ``error`` (the first ``times`` opens, or always); the opened urls."""
    opened = []

    def fake(u, *args, **kwargs):
        opened.append(u)
        if u == url and (times is None or opened.count(u) <= times):
            raise error
        return open_shard(u, *args, **kwargs)

    monkeypatch.setattr(stream_mod, "open_shard", fake)
    return opened


@pytest.mark.parametrize("workers", [0, 2])
def test_a_permission_error_stops_the_rank_with_that_error(shards, monkeypatch, workers):
    # Tests run as root, where chmod 000 does not deny a read: the open raises as it would.
    url = shards.shards[1].url
    failing_open(monkeypatch, url, PermissionError(errno.EACCES, "Permission denied", url))
    with pytest.raises(StreamError, match="PermissionError") as caught:
        batches(shards, workers)
    assert url in str(caught.value) and "bad data" in str(caught.value)  # "...not bad data, so the rank stops"
    if workers == 0:  # through a worker the DataLoader re-raises it with the chain as text
        assert isinstance(caught.value.__cause__, PermissionError)


def test_a_full_disk_is_not_bad_data(shards, monkeypatch):
    url = shards.shards[0].url
    failing_open(monkeypatch, url, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(StreamError) as caught:
        all_samples(shards)
    assert caught.value.__cause__.errno == errno.ENOSPC


@pytest.mark.parametrize("error", [TypeError("bad operand"), AttributeError("no attribute 'foo'"),
                                   RuntimeError("shape mismatch")])
def test_a_failing_augmentation_stops_the_rank(shards, monkeypatch, error):
    def policy(image):
        raise error

    monkeypatch.setattr(stream_mod, "make_policy", lambda *args: policy)
    with pytest.raises(StreamError, match=type(error).__name__) as caught:
        batches(shards, workers=0)
    assert caught.value.__cause__ is error
    assert ".tar: sample 's000" in str(caught.value)  # names the shard and the sample


def test_a_transient_error_on_open_is_retried_and_changes_nothing(shards, monkeypatch, no_wait):
    expected = all_samples(shards)
    url = shards.shards[0].url
    opened = failing_open(monkeypatch, url, OSError(errno.EIO, "Input/output error"), times=2)
    assert all_samples(shards) == expected
    assert opened.count(url) == 3 and not any(s.bad for s in expected)


class _BrokenAfter:
    """A file that raises EIO once ``limit`` bytes have been read from it, as a network filesystem may."""

    def __init__(self, f, limit: int):
        self.f, self.left = f, limit

    def read(self, n=-1):
        if self.left <= 0:
            raise OSError(errno.EIO, "Input/output error")
        data = self.f.read(self.left if n < 0 else min(n, self.left))
        self.left -= len(data)
        return data

    def close(self):
        self.f.close()


def test_a_transient_error_mid_shard_resumes_without_duplicates(shards, monkeypatch, no_wait):
    expected = all_samples(shards)
    url, opens = shards.shards[1].url, []

    def flaky(u, *args, **kwargs):
        opens.append(u)
        f = open_shard(u, *args, **kwargs)
        return _BrokenAfter(f, os.path.getsize(u) // 2) if u == url and opens.count(u) == 1 else f

    monkeypatch.setattr(stream_mod, "open_shard", flaky)
    assert all_samples(shards) == expected  # the samples before the error are not yielded again
    assert opens.count(url) == 2


def test_a_lasting_transient_error_makes_the_rest_of_the_shard_bad(shards, monkeypatch, no_wait):
    url = shards.shards[0].url
    opened = failing_open(monkeypatch, url, OSError(errno.ESTALE, "Stale file handle"))
    got = all_samples(shards)
    assert opened.count(url) == stream_mod.READ_TRIES
    assert [s.key for s in got[8:]] == [f"s{i:05d}" for i in range(8, 16)] and not any(s.bad for s in got[8:])
    assert all(s.bad.startswith(f"unreadable tar after 0 samples ({stream_mod.READ_TRIES} tries): ")
               for s in got[:8])


def test_a_shard_missing_from_disk_is_bad_data(tmp_path):
    shards = resolve_shards(str(write_layout(tmp_path / "set", [4, 4])))
    os.remove(shards.shards[0].url)
    got = list(read_samples(reads_for_range(list(shards.shards), 0, 8), num_classes=4))
    assert [bool(s.bad) for s in got] == [True] * 4 + [False] * 4
    assert got[0].bad.startswith("unreadable tar after 0 samples: [Errno 2]")


@pytest.mark.parametrize("data", [b"not an image", b"\xff\xd8 a broken jpeg", b"\x89PNG\r\n\x1a\n broken"])
def test_undecodable_bytes_raise_decode_error(data):
    with pytest.raises(DecodeError) as caught:
        eval_sample(data, 16, 16)
    assert caught.value.__cause__ is not None


def test_a_crop_bug_after_a_good_decode_is_no_decode_error(monkeypatch):
    def broken_interpolate(*args, **kwargs):
        raise TypeError("interpolate() got an unexpected keyword")

    monkeypatch.setattr(decode.F, "interpolate", broken_interpolate)
    with pytest.raises(TypeError):
        eval_sample(image_bytes(1), 16, 16)
