"""Shards read from a real nginx over HTTP and HTTPS, from a real S3-compatible store (``rclone
serve s3``) and from ``pipe:`` commands (``distrain/data/remote.py``), against the same shards read
from disk."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
import time

import pytest
from conftest import checked, distrain, read_jsonl, write_layout
from servers import DroppingProxy, Nginx, RcloneS3, ServerUnavailable
from test_train import recipe

from distrain.bench import bench_loader, format_loader
from distrain.data import remote
from distrain.data.remote import ShardCache
from distrain.data.shards import Read, resolve_shards
from distrain.data.stream import READ_TRIES, StreamError, read_samples
from distrain.errors import DistrainError

COUNTS = [7, 5, 9, 6]
BIG = [40, 33]  # about 2 kB per sample: 82 and 68 kB
CUT = 30_000  # bytes before a cut: Python's tarfile reads 10 kB records, so 2 records, about 10 samples


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(the served root, the server): ``root/set`` holds 4 shards, ``root/gone`` the same set with
    shard 02 deleted, ``root/big`` 2 larger shards."""
    root = tmp_path_factory.mktemp("www")
    write_layout(root / "set", COUNTS)
    write_layout(root / "big", BIG)
    shutil.copytree(root / "set", root / "gone")
    (root / "gone" / "shard-02.tar").unlink()
    try:
        server = Nginx(root, tmp_path_factory.mktemp("nginx")).__enter__()
    except ServerUnavailable as e:
        pytest.skip(f"no nginx here: {e}")
    yield root, server
    server.__exit__()


def _records(shardset, skip=2, take=None):
    """(key, label, bytes) of every sample of ``shardset`` after the first ``skip`` of each shard."""
    reads = [Read(s.url, skip, take or s.samples - skip) for s in shardset.shards]
    return [(r.key, r.label, r.data, r.bad) for r in read_samples(reads, num_classes=4)]


def test_remote_specs_name_their_index_and_tars():
    assert remote.is_directory("https://h/sets/train/") and remote.is_directory("s3x://b/p")
    assert not remote.is_directory("https://h/sets/train/train-000001.tar")
    assert remote.index_location("https://h/sets/train") == "https://h/sets/train/index.json"
    assert remote.index_location("https://h/sets/train/t-01.tar") == "https://h/sets/train/index.json"
    pipe = "pipe:aws s3 cp s3://bucket/sets/train/t-01.tar -"
    assert remote.index_location(pipe) == "pipe:aws s3 cp s3://bucket/sets/train/index.json -"
    assert remote.tar_name(pipe) == "t-01.tar" and remote.tar_name("https://h/a/t-02.tar") == "t-02.tar"
    # the shell sees the index's command as it sees the tar's: variables, pipes and quotes kept
    piped = "pipe:aws s3 cp s3://$BUCKET/sets/t-01.tar - | cat"
    assert remote.index_location(piped) == "pipe:aws s3 cp s3://$BUCKET/sets/index.json - | cat"
    assert remote.index_location("pipe:cat 'my sets/t-01.tar'") == "pipe:cat 'my sets/index.json'"
    assert remote.index_location(r"pipe:cat my\ sets/t-01.tar") == "pipe:cat 'my sets/index.json'"
    with pytest.raises(DistrainError, match="needs the tar's path or URL"):
        remote.index_location("pipe:cat -")


def test_s3_without_boto3_says_what_to_install(monkeypatch):
    for module in ("boto3", "botocore", "botocore.config", "botocore.exceptions"):
        monkeypatch.setitem(sys.modules, module, None)  # what an install without distrain[s3] has
    monkeypatch.setattr(remote, "_s3_clients", {})
    for call in (lambda: resolve_shards("s3://bucket/sets/train/"), lambda: remote.is_missing("s3://b/t-01.tar"),
                 lambda: remote.upload_set(".", "s3://bucket/sets/train/")):
        with pytest.raises(DistrainError, match=r"need boto3: pip install 'distrain\[s3\]'"):
            call()


def test_a_url_with_a_password_is_refused_without_printing_it():
    with pytest.raises(DistrainError) as e:
        resolve_shards("https://alice:s3cret@example.org/sets/train/")
    assert "example.org" in str(e.value) and "s3cret" not in str(e.value) and "netrc" in str(e.value)


def test_a_remote_set_resolves_like_the_local_one_with_one_request(served, monkeypatch):
    root, server = served
    local = resolve_shards(str(root / "set"))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(server.ca))
    specs = [server.url + "set/", server.url + "set", server.url + "set/shard-{00..03}.tar",
             server.tls_url + "set/", f"pipe:cat {root}/set/shard-{{00..03}}.tar"]
    for spec in specs:
        got = resolve_shards(spec)
        assert [(s.samples, s.class_counts) for s in got.shards] == [(s.samples, s.class_counts) for s in local.shards]
        assert got.classes == local.classes and got.total == sum(COUNTS)
    assert resolve_shards(server.url + "set/").shards[1].url == server.url + "set/shard-01.tar"


def test_remote_reads_yield_the_local_samples(served, monkeypatch):
    root, server = served
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(server.ca))
    expected = _records(resolve_shards(str(root / "set")))
    assert len(expected) == sum(COUNTS) - 2 * len(COUNTS) and not any(r[3] for r in expected)
    for spec in (server.url + "set/", server.tls_url + "set/", f"pipe:cat {root}/set/shard-{{00..03}}.tar"):
        assert _records(resolve_shards(spec)) == expected, spec


@pytest.fixture(scope="module")
def s3(served, tmp_path_factory):
    """An S3 store whose bucket ``www`` is the served root; its AWS variables are set meanwhile."""
    root, _ = served
    try:
        store = RcloneS3(root.parent, tmp_path_factory.mktemp("rclone")).__enter__()
    except ServerUnavailable as e:
        pytest.skip(f"no S3 server here: {e}")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in store.env.items():
            mp.setenv(k, v)
        yield f"s3://{root.name}/"
    store.__exit__()


def test_an_s3_set_resolves_and_reads_like_the_local_one(served, s3):
    root, _ = served
    local = resolve_shards(str(root / "set"))
    expected = _records(local)
    for spec in (s3 + "set/", s3 + "set/shard-{00..03}.tar"):
        got = resolve_shards(spec)
        assert [s.samples for s in got.shards] == COUNTS and got.classes == local.classes
        assert _records(got) == expected
    with pytest.raises(DistrainError, match=r"nothing/index.json: no shard index there"):
        resolve_shards(s3 + "nothing/")
    gone = resolve_shards(s3 + "gone/")
    records = list(read_samples([Read(gone.shards[2].url, 0, COUNTS[2])], num_classes=4))
    assert all("S3" in r.bad and r.url == s3 + "gone/shard-02.tar" for r in records)


def test_the_writer_uploads_a_set_to_s3_index_last_and_refuses_to_overwrite(served, s3, tmp_path):
    root, _ = served
    out = checked(distrain(["data", "digits", "--out", s3 + "digits", "--samples-per-shard", "500"], cwd=tmp_path))
    assert f"train: {s3}digits/train/" in out.stdout and f"test: {s3}digits/test/" in out.stdout
    got = resolve_shards(s3 + "digits/train/")
    assert got.total == 1437 and len(got.shards) == 3 and (root / "digits" / "train" / "index.json").is_file()
    again = distrain(["data", "digits", "--out", s3 + "digits"], cwd=tmp_path)
    assert again.returncode != 0 and "already there (pass --overwrite" in again.stderr
    assert "Traceback" not in again.stderr


def test_missing_index_unlisted_tar_and_untrusted_tls_are_one_line_errors(served, monkeypatch):
    root, server = served
    with pytest.raises(DistrainError, match=r"nothing/index.json: no shard index there"):
        resolve_shards(server.url + "nothing/")
    with pytest.raises(DistrainError, match=r"set/shard-09.tar: not listed in .*set/index.json"):
        resolve_shards(server.url + "set/shard-09.tar")
    with pytest.raises(DistrainError, match=r"no shard index there"):
        resolve_shards(f"pipe:cat {root}/nothing/shard-00.tar")
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    with pytest.raises(DistrainError, match=r"TLS failed .*REQUESTS_CA_BUNDLE"):
        resolve_shards(server.tls_url + "set/")


def test_a_dropped_connection_is_reread_without_a_sample_twice_or_lost(served):
    root, server = served
    expected = _records(resolve_shards(str(root / "big")), skip=3)
    # Every second connection is cut part-way into a shard, after some of its samples were yielded.
    with DroppingProxy(server.port, after_bytes=CUT, drop=lambda n: n % 2 == 1) as proxy:
        assert _records(resolve_shards(proxy.url + "big/"), skip=3) == expected
    assert proxy.dropped == len(BIG)


def test_a_shard_that_stays_unreachable_is_bad_data_naming_its_url(served):
    root, server = served
    with DroppingProxy(server.port, after_bytes=CUT, drop=lambda n: n > 0) as proxy:
        shards = resolve_shards(proxy.url + "big/")
        records = list(read_samples([Read(shards.shards[0].url, 0, BIG[0])], num_classes=4))
    assert proxy.dropped == READ_TRIES
    good = [r for r in records if not r.bad]
    bad = [r for r in records if r.bad]
    # The samples before the first cut came once, in order; the rest of the shard is bad.
    local = list(read_samples([Read(resolve_shards(str(root / "big")).shards[0].url, 0, BIG[0])], num_classes=4))
    assert 0 < len(good) < BIG[0] and records[:len(good)] == [r._replace(url=good[0].url) for r in local[:len(good)]]
    assert len(records) == BIG[0] and records[len(good):] == bad
    assert all(r.url == proxy.url + "big/shard-00.tar" and f"({READ_TRIES} tries)" in r.bad for r in bad)
    # A shard its index lists that the server does not have (404) is bad at once, not retried.
    gone = resolve_shards(server.url + "gone/")
    records = list(read_samples([Read(gone.shards[2].url, 0, COUNTS[2])], num_classes=4))
    assert len(records) == COUNTS[2] and all("HTTP 404" in r.bad and r.url.endswith("gone/shard-02.tar")
                                             for r in records)


def test_a_chatty_pipe_command_reads_through_and_a_missing_command_stops_the_rank(tmp_path):
    layout = write_layout(tmp_path / "set", [6])
    local = list(read_samples([Read(str(layout / "shard-00.tar"), 0, 6)], num_classes=4))
    # 1 MB on stderr before the tar: read only at the end, it must not fill a pipe and block.
    chatty = f"pipe:head -c 1000000 /dev/zero >&2; cat {layout}/shard-00.tar"
    records = list(read_samples([Read(chatty, 0, 6)], num_classes=4))
    assert [(r.key, r.data, r.bad) for r in records] == [(r.key, r.data, r.bad) for r in local]
    # A command the shell cannot find is a setup error, not missing data: the rank stops, naming it.
    with pytest.raises(StreamError, match=r"no-such-tool-xyz.*exited 127.*not bad data"):
        list(read_samples([Read(f"pipe:no-such-tool-xyz {layout}/shard-00.tar", 0, 6)], num_classes=4))


def _read_through(cache_dir: str, url: str, out) -> None:
    with ShardCache(cache_dir, 2**30).open(url) as f:
        out.put(f.read())


def test_the_cache_is_filled_once_by_two_processes_at_once_without_a_torn_file(served, tmp_path):
    root, server = served
    truth = (root / "big" / "shard-00.tar").read_bytes()
    out = multiprocessing.get_context("fork").Queue()
    with DroppingProxy(server.port, delay_s=0.2) as proxy:  # about 1 s a download
        url = proxy.url + "big/shard-00.tar"
        readers = [multiprocessing.get_context("fork").Process(target=_read_through, args=(str(tmp_path), url, out))
                   for _ in range(2)]
        for p in readers:
            p.start()
        got = [out.get(timeout=60) for _ in readers]
        for p in readers:
            p.join(timeout=30)
        assert got == [truth, truth] and proxy.connections == 1
        with ShardCache(str(tmp_path), 2**30).open(url) as f:  # a later epoch reads the copy
            assert f.read() == truth and proxy.connections == 1
    assert sorted(p.name.split("-", 1)[1] for p in tmp_path.iterdir()) == ["shard-00.tar", "shard-00.tar.lock"]


def test_the_cache_keeps_its_bound_and_never_a_partial_download(served, tmp_path):
    root, server = served
    sizes = [(root / "big" / f"shard-0{i}.tar").stat().st_size for i in range(2)]
    cache = ShardCache(str(tmp_path), max(sizes) + 1000)
    for i in (0, 1):
        cache.open(server.url + f"big/shard-0{i}.tar").close()
    kept = [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]
    assert [p.name.split("-", 1)[1] for p in kept] == ["shard-01.tar"]  # the older one made room
    with DroppingProxy(server.port, after_bytes=CUT, drop=lambda n: True) as proxy:
        with pytest.raises(ConnectionResetError):
            cache.open(proxy.url + "big/shard-00.tar")
    assert [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == kept
    # A worker killed mid-download (a preempted job's) leaves its part: a stale one goes at the next
    # download, a fresh one (a download in progress elsewhere) stays.
    stale, live = tmp_path / ".shard-00.tar.999.dead.part", tmp_path / ".shard-00.tar.998.live.part"
    for part in (stale, live):
        part.write_bytes(b"x" * 1000)
    os.utime(stale, (time.time() - remote.STALE_PART_S - 60,) * 2)
    cache.open(server.url + "big/shard-00.tar").close()
    assert not stale.exists() and live.exists()


def test_bench_loader_streams_a_url_next_to_the_local_copy(served, tmp_path, capsys):
    root, server = served
    result = bench_loader(server.url + "big/", workers=0, resolutions=[16], batch=4, rounds=1, batches=2,
                          work_dir=tmp_path, images=40)
    assert result["remote"] == server.url + "big/" and result["images_per_s"]["remote"][16] > 0
    ratio = result["ratios"]["remote_vs_local"][16]
    assert ratio == pytest.approx(result["images_per_s"]["remote"][16] / result["images_per_s"]["distrain"][16])
    assert f"distrain streaming {server.url}big/" in format_loader(result)


@pytest.mark.dist
def test_a_listed_shard_the_store_lacks_stops_every_rank_before_training(served, tmp_path, digits):
    root, server = served
    cfg = recipe(tmp_path, digits, data={"train": server.url + "gone/", "eval": server.url + "set/"})
    proc = distrain(["train", cfg], cwd=tmp_path, nproc=2)
    message = f"{server.url}gone/shard-02.tar: listed in its shard set's index, but the store has no such object"
    assert proc.returncode != 0 and proc.stderr.count(message) == 2, proc.stderr[-3000:]  # each rank, alike
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or "train/loss" not in (
        tmp_path / "run" / "metrics.jsonl").read_text()


@pytest.mark.slow
@pytest.mark.dist
def test_local_http_s3_and_pipe_runs_train_alike_on_two_ranks_and_resume_exactly(tmp_path, digits, monkeypatch):
    try:
        server = Nginx(digits, tmp_path / "nginx").__enter__()
    except ServerUnavailable as e:
        pytest.skip(f"no nginx here: {e}")
    try:
        store = RcloneS3(digits.parent, tmp_path / "rclone").__enter__()
    except ServerUnavailable as e:
        server.__exit__()
        pytest.skip(f"no S3 server here: {e}")
    for k, v in store.env.items():
        monkeypatch.setenv(k, v)  # the ranks inherit the standard AWS variables
    try:
        def run(name, train, *args):
            where = tmp_path / name
            where.mkdir(exist_ok=True)
            cfg = recipe(where, digits, data={"train": train}, schedule={"epochs": 1},
                         checkpoint={"every_epochs": 1, "keep_last": 2}, eval={"every_epochs": 1})
            checked(distrain(["train", cfg, *args], cwd=where, nproc=2))
            log = read_jsonl(where / "run" / "metrics.jsonl")
            return {e["step"]: e["train/loss"] for e in log if "train/loss" in e}, log

        local, _ = run("local", str(digits / "train"))
        assert len(local) == 22
        remote = {"http": server.url + "train/", "s3": f"s3://{digits.name}/train/",
                  "pipe": f"pipe:cat {digits}/train/" + "train-{000000..000007}.tar"}
        cache = tmp_path / "cache"  # the S3 run keeps its shards there: 2 ranks x 1 worker share it
        for name, spec in remote.items():
            losses, log = run(name, spec, *([f"data.cache_dir={cache}"] if name == "s3" else []))
            assert losses == local, name
            assert [e.get("eval/skipped", 0) for e in log if "eval/top1" in e] == [0], name
        assert len([p for p in cache.iterdir() if p.name.endswith(".tar")]) == 8
        assert not [p for p in cache.iterdir() if p.name.endswith(".part")]
        run("resumed", remote["http"], "train.max_updates=9")  # stopped mid-epoch
        resumed, _ = run("resumed", remote["http"], "--resume", "auto")
        assert resumed == local
    finally:
        store.__exit__()
        server.__exit__()
