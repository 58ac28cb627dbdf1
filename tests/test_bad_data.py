"""Bad data in the shard stream: reported in the batch's "bad", never raised, never changing the batches."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
from conftest import image_bytes, write_layout

from distrain.data.index import write_index
from distrain.data.shards import resolve_shards
from distrain.data.stream import PAD_LABEL, Augment, EvalResize, ShardStream, make_loader

CLASSES = 4
AUG = Augment(size=8, scale=(0.5, 1.0), ratio=(0.75, 1.33), hflip=True)
CROP = 16


def key(n: int) -> str:
    return f"s{n:05d}"


# sample number -> (the files written instead of its image and label, how its report starts)
BAD = {
    3: ({"png": image_bytes(3)[:60], "cls": b"3"}, "undecodable image: image file is truncated"),
    10: ({"jpg": b"not an image", "cls": b"2"}, "undecodable image: cannot identify image file"),
    12: ({"png": image_bytes(12)}, "no .cls label"),
    17: ({"cls": b"1"}, "no image"),
    21: ({"png": image_bytes(21), "cls": b"7"}, "label 7 out of range [0, 4)"),
    26: ({"jpg": image_bytes(26, size=32, fmt="JPEG")[:-20], "cls": b"2"},
         "undecodable image: image file is truncated"),
}


def write_set(out: Path, counts: list[int], files: dict[int, dict[str, bytes]]) -> Path:
    """Shards like ``conftest.write_layout``, except that sample ``n`` holds ``files[n]`` where given."""
    out.mkdir(parents=True)
    n = 0
    for i, c in enumerate(counts):
        with wds.TarWriter(str(out / f"shard-{i:02d}.tar")) as tw:
            for j in range(n, n + c):
                good = {"png": image_bytes(j), "cls": str(j % CLASSES).encode()}
                tw.write({"__key__": key(j), **files.get(j, good)})
        n += c
    write_index(out, [(f"shard-{i:02d}.tar", c) for i, c in enumerate(counts)], [str(k) for k in range(CLASSES)])
    return out


def url_of(shards, n: int) -> str:
    """The url of the shard holding sample ``n``."""
    for s in shards.shards:
        if n < s.samples:
            return s.url
        n -= s.samples
    raise IndexError(n)


def train_stream(shards, rank=0, world=1, batch=4, batches=4, block=6):
    return ShardStream(shards, rank=rank, world_size=world, batch_size=batch, seed=0, num_classes=CLASSES,
                       augment=AUG, batches_per_epoch=batches, shuffle_block=block)


def eval_stream(shards, rank, world, batch=5):
    return ShardStream(shards, rank=rank, world_size=world, batch_size=batch, seed=0, num_classes=CLASSES,
                       eval_resize=EvalResize(CROP, CROP))


def batches_of(stream, workers, skip=0) -> list[dict]:
    stream.set_position(0, skip)
    return list(make_loader(stream, workers, prefetch=2, pin_memory=False))


def check_shapes(batches, count, batch, side):
    assert len(batches) == count
    for b in batches:
        assert b["image"].shape == (batch, 3, side, side) and b["label"].shape == (batch,) and len(b["key"]) == batch


def check_train(shards, good: set[str], workers: int, world=2, batch=4, batches=4) -> list[tuple]:
    """Train every rank: unchanged batches holding only good samples with their own labels; the reports."""
    bad, seen = [], set()
    for rank in range(world):
        out = batches_of(train_stream(shards, rank, world, batch, batches), workers)
        check_shapes(out, batches, batch, AUG.size)
        for b in out:
            assert all(isinstance(r, tuple) and len(r) == 3 for r in b["bad"])
            bad += b["bad"]
            assert set(b["key"]) <= good
            assert b["label"].tolist() == [int(k[1:]) % CLASSES for k in b["key"]]
            seen.update(b["key"])
    assert seen == good  # a bad position only ever repeats a sample that also has its own position
    return bad


def check_eval(shards, good: set[str], workers: int, world: int) -> list[tuple]:
    """Evaluate on every rank: equal batch counts, every good sample counted once, no bad one; the reports."""
    bad, counted, lengths = [], Counter(), set()
    for rank in range(world):
        out = batches_of(eval_stream(shards, rank, world), workers)
        lengths.add(len(out))
        check_shapes(out, len(out), 5, CROP)
        for b in out:
            bad += b["bad"]
            counted.update(k for k, label in zip(b["key"], b["label"].tolist()) if label != PAD_LABEL)
    assert len(lengths) == 1
    assert set(counted) == good and set(counted.values()) == {1}
    return bad


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory):
    files = {n: f for n, (f, _) in BAD.items()}
    return resolve_shards(str(write_set(tmp_path_factory.mktemp("corrupt") / "set", [8, 8, 8, 8], files)))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_bad_samples_are_reported_and_replaced(corrupt, mode, workers):
    good = {key(n) for n in range(32) if n not in BAD}
    bad = check_train(corrupt, good, workers) if mode == "train" else check_eval(corrupt, good, workers, world=3)
    expected = {(url_of(corrupt, n), key(n)): why for n, (_, why) in BAD.items()}
    assert len(bad) == len(expected)
    for url, k, reason in bad:
        assert reason.startswith(expected[url, k]), (k, reason)


def truncated_set(out: Path) -> tuple:
    """shard-01 (samples 8..15) cut inside the image of sample 13: samples 8..12 survive.

    Sample 12 survives because sample 13's label, the first file of sample 13, was read in full.
    """
    d = write_layout(out, [8, 8, 8, 8], num_classes=CLASSES)
    tar = d / "shard-01.tar"
    with tarfile.open(tar) as tf:
        cut = tf.getmember(f"{key(13)}.png").offset_data + 10
    os.truncate(tar, cut)
    bad = [(str(tar), "", "unreadable tar after 5 samples: ")] * 3
    return resolve_shards(str(d)), {key(n) for n in range(32) if n not in (13, 14, 15)}, bad


def short_set(out: Path) -> tuple:
    """shard-02 holds its 8 samples while the index claims 11: 3 positions have no sample."""
    d = write_layout(out, [8, 8, 8, 8], num_classes=CLASSES)
    write_index(d, [("shard-00.tar", 8), ("shard-01.tar", 8), ("shard-02.tar", 11), ("shard-03.tar", 8)],
                [str(k) for k in range(CLASSES)])
    bad = [(str(d / "shard-02.tar"), "", "shard ends after 8 samples, fewer than its index says")] * 3
    return resolve_shards(str(d)), {key(n) for n in range(32)}, bad


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("make", [truncated_set, short_set])
def test_shard_cut_short_loses_its_tail_and_nothing_else(tmp_path, make, mode, workers):
    shards, good, expected = make(tmp_path / "set")
    if mode == "train":  # one rank's batches cover all positions, so every lost one is in some batch
        batch = next(b for b in (5, 4) if shards.total % b == 0)
        bad = check_train(shards, good, workers, world=1, batch=batch, batches=shards.total // batch)
    else:
        bad = check_eval(shards, good, workers, world=2)
    assert [(u, k) for u, k, _ in bad] == [(u, k) for u, k, _ in expected]
    assert all(r.startswith(why) for (_, _, r), (_, _, why) in zip(bad, expected)), bad


@pytest.mark.parametrize("workers", [0, 2])
def test_training_fills_bad_positions_from_good_samples(tmp_path, workers):
    # One shard read in order (block 1); batches of 4: [0..3] all bad, [4..7] with 5 bad, [8..11] all bad.
    bad_ones = (0, 1, 2, 3, 5, 8, 9, 10, 11)
    corrupt = {"png": b"\x89PNG broken", "cls": b"0"}
    shards = resolve_shards(str(write_set(tmp_path / "set", [12], dict.fromkeys(bad_ones, corrupt))))
    out = batches_of(train_stream(shards, batches=3, block=1), workers)
    check_shapes(out, 3, 4, AUG.size)
    # With 2 workers, worker 0 reads samples 0..7 (rank batches 0 and 2), worker 1 samples 8..11 (batch 1).
    starts = [0, 4, 8] if workers == 0 else [0, 8, 4]
    # A bad position copies its batch's good samples in turn, else its worker's last good sample, else
    # is zeros with label PAD_LABEL when its worker has produced no good sample yet.
    pad = [""] * 4
    fills = {0: [pad, ["s00004", "s00004", "s00006", "s00007"], ["s00007"] * 4],
             2: [pad, pad, ["s00004", "s00004", "s00006", "s00007"]]}[workers]
    for b, lo, keys in zip(out, starts, fills):
        assert b["key"] == keys
        assert [k for _, k, _ in b["bad"]] == [key(n) for n in range(lo, lo + 4) if n in bad_ones]
        if keys == pad:
            assert b["label"].tolist() == [PAD_LABEL] * 4 and not b["image"].any()
    batch = out[1] if workers == 0 else out[2]
    assert (batch["image"][0] == batch["image"][1]).all()


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_never_decodes_the_skipped_samples(tmp_path, workers):
    # One corrupt image per shard: no batch ever has fewer than two good samples to copy from.
    files = {n: {"png": image_bytes(n)[:60], "cls": b"0"} for n in (1, 9, 18, 27)}
    shards = resolve_shards(str(write_set(tmp_path / "set", [8, 8, 8, 8], files)))
    full = batches_of(train_stream(shards, batches=8), workers)
    assert sum(len(b["bad"]) for b in full) == 4
    for skip in range(1, 8):
        resumed = batches_of(train_stream(shards, batches=8), workers, skip)
        assert [b["key"] for b in resumed] == [b["key"] for b in full[skip:]]
        # the corrupt samples in the skipped batches were read past, not decoded: no report for them
        assert [b["bad"] for b in resumed] == [b["bad"] for b in full[skip:]]
    assert any(b["bad"] for b in full[:7])


def plain_set(out: Path):
    """32 good samples in 4 shards."""
    return resolve_shards(str(write_layout(out, [8, 8, 8, 8], num_classes=CLASSES)))


def test_workers_ignore_job_signals_from_other_processes(tmp_path):
    loader = make_loader(train_stream(plain_set(tmp_path / "set"), batch=2, batches=16), 2, 2, pin_memory=False)
    pickle.dumps(loader.worker_init_fn)  # a spawned worker must be able to receive it
    it = iter(loader)
    got = [next(it), next(it)]  # one batch from each worker: both have run their init
    pids = [w.pid for w in it._workers]
    # as under SLURM, the signals come from another process than the workers' parent
    kill = f"import os, signal\nfor p in {pids}:\n os.kill(p, signal.SIGUSR1)\n os.kill(p, signal.SIGTERM)"
    subprocess.run([sys.executable, "-c", kill], check=True)
    time.sleep(0.2)  # let the signals land before the workers are asked for more
    got += list(it)
    assert len(got) == 16


def test_a_process_exits_with_live_workers(tmp_path):
    # Exiting terminates daemonic workers with SIGTERM, then joins them: they must still obey it.
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from pathlib import Path
from test_bad_data import plain_set, train_stream
from distrain.data.stream import make_loader
it = iter(make_loader(train_stream(plain_set(Path(sys.argv[1])), batch=2, batches=16), 2, 2, pin_memory=False))
next(it)
raise SystemExit(3)
"""
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "set")], timeout=180, capture_output=True)
    assert proc.returncode == 3, proc.stderr.decode()[-2000:]
