"""Shards and shard-set indexes at URLs: HTTP(S) servers, S3-compatible object stores and ``pipe:``
commands, next to local paths.

A remote shard spec names a shard-set directory (``https://host/sets/train/``,
``s3://bucket/sets/train/``) or tars (``https://host/sets/train/train-{000000..000127}.tar``,
brace-expanded with no listing). The set's ``index.json`` is read from the same directory with one
GET, so epochs are sized without listing the store or scanning a tar. A ``pipe:CMD`` spec runs CMD
through the shell and reads the tar from its standard output (``pipe:gsutil cat
gs://bucket/train-000000.tar``); its index comes from the same command with the ``.tar`` word
replaced by ``index.json`` in the same directory.

Credentials and endpoints come from the standard environment, never from the recipe: ``requests``
reads ``~/.netrc`` and the proxy and CA variables (``REQUESTS_CA_BUNDLE``, ``SSL_CERT_FILE``), boto3
reads ``AWS_*`` (``AWS_ENDPOINT_URL`` for a store other than AWS, which is then addressed path-style,
as MinIO, Ceph and rclone expect) and ``~/.aws``, and a ``pipe:`` command sees the environment as it
is. A URL holding a user or password is refused (:func:`check_spec`), so that none is written to a
recipe, a resolved config or a log.

A transient failure (a refused or dropped connection, a timeout, an HTTP 429 or 5xx, an S3 error
other than a missing key or a refusal, a ``pipe:`` command that exits non-zero) raises
:class:`ConnectionResetError`, which the stream retries by reopening the shard and skipping what it
already yielded; a 404 (S3 NoSuchKey) raises :class:`FileNotFoundError`, which is bad data at once.
:class:`ShardCache` keeps remote shards on a node-local disk for later epochs (``data.cache_dir``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import http.client
import io
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3

from distrain.errors import DistrainError

HTTP_SCHEMES = ("http://", "https://")
S3 = "s3://"
URL_SCHEMES = (*HTTP_SCHEMES, S3)
PIPE = "pipe:"
CONNECT_TIMEOUT_S = 30
"""Seconds to wait for a server to accept a connection."""
READ_TIMEOUT_S = 60
"""Seconds a read may wait for the next bytes before the connection counts as dropped."""
STALE_PART_S = 3600
"""A cache's partial download untouched for this long was left by a killed process: deleted."""
INDEX_TRIES = 4
"""Reads of a remote index, the first included, before a transient failure stops the run."""
_TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


def is_remote(spec: str) -> bool:
    """Whether a shard spec is a URL or a ``pipe:`` command rather than a local path."""
    return spec.startswith(URL_SCHEMES) or spec.startswith(PIPE)


def check_spec(spec: str) -> None:
    """Refuse a remote spec that carries credentials.

    Raises:
        DistrainError: the URL names a user or password, naming the host only.
    """
    if spec.startswith(HTTP_SCHEMES) and "@" in urlsplit(spec).netloc:
        host = urlsplit(spec).netloc.rsplit("@", 1)[1]
        raise DistrainError(f"a shard URL for {host} holds a user or password; put credentials in ~/.netrc "
                            "(or the environment), never in the recipe")


def _pipe_target(spec: str) -> tuple[list[str], int]:
    """The words of a ``pipe:`` command and the index of its ``.tar`` word."""
    words = shlex.split(spec[len(PIPE):])
    tars = [i for i, w in enumerate(words) if w.endswith(".tar")]
    if not tars:
        raise DistrainError(f"{spec}: a pipe: shard spec needs the tar's path or URL as one word ending in .tar, "
                            "so that its index.json can be found beside it")
    return words, tars[-1]


def is_directory(spec: str) -> bool:
    """Whether a remote spec names a shard-set directory (its index lists the tars) or one tar."""
    return not spec.startswith(PIPE) and not urlsplit(spec).path.endswith(".tar")


def index_location(spec: str) -> str:
    """Where the index of the set holding ``spec`` (a directory or one tar) is read from."""
    if spec.startswith(PIPE):
        words, i = _pipe_target(spec)
        tar = words[i]
        index = tar.rsplit("/", 1)[0] + "/index.json" if "/" in tar else "index.json"
        # Replaced in the command as written, so that its shell sees what the shard's command
        # gives it ($VARS, pipes, quotes); rebuilt from the words only if the tar was escaped there.
        raw = spec[len(PIPE):]
        at = raw.rfind(tar)
        if at < 0:
            words[i] = index
            return PIPE + shlex.join(words)
        return PIPE + raw[:at] + index + raw[at + len(tar):]
    return shard_location(spec, "index.json") if is_directory(spec) else spec.rsplit("/", 1)[0] + "/index.json"


def shard_location(directory: str, name: str) -> str:
    """The URL of tar ``name`` listed by the index of the set directory ``directory``."""
    parts = urlsplit(directory)
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    return urlunsplit(parts._replace(path=path + name))


def tar_name(spec: str) -> str:
    """The file name of the tar a remote spec reads (as its index lists it)."""
    if spec.startswith(PIPE):
        words, i = _pipe_target(spec)
        return words[i].rsplit("/", 1)[-1]
    return urlsplit(spec).path.rsplit("/", 1)[-1]


def read_index_bytes(location: str) -> bytes:
    """The bytes of a remote index, retried with backoff on transient failures.

    Raises:
        DistrainError: the index is missing or stays unreachable, naming its URL.
    """
    for attempt in range(INDEX_TRIES):
        try:
            with open_remote(location) as f:
                return f.read()
        except PermissionError as e:
            raise DistrainError(f"{location}: {e.strerror}") from None
        except FileNotFoundError:
            raise DistrainError(f"{location}: no shard index there (write one with `distrain data index` "
                                "before uploading, or name the set's directory)") from None
        except ConnectionResetError as e:
            if attempt + 1 == INDEX_TRIES:
                raise DistrainError(f"{location}: shard index unreachable after {INDEX_TRIES} tries "
                                    f"({e.strerror})") from None
            time.sleep(0.5 * 2**attempt)
        except OSError as e:
            raise DistrainError(f"{location}: shard index unreadable ({e.strerror or e})") from None
    raise AssertionError("unreachable")


def open_remote(url: str) -> IO[bytes]:
    """A streaming binary reader of a remote shard or index.

    Raises:
        FileNotFoundError: the server says the file is not there (HTTP 404/410).
        ConnectionResetError: a transient failure, on opening or later while reading.
        PermissionError: the server refuses access (HTTP 401/403) or TLS fails: not retried, not
            bad data.
    """
    if url.startswith(PIPE):
        return _PipeReader(url)
    if url.startswith(S3):
        return _open_s3(url)
    try:
        response = requests.get(url, stream=True, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
    except requests.exceptions.SSLError as e:
        raise PermissionError(errno.EACCES, f"TLS failed ({_reason(e)}; a private CA goes in REQUESTS_CA_BUNDLE)",
                              url) from None
    except (requests.ConnectionError, requests.Timeout) as e:
        raise ConnectionResetError(errno.ECONNRESET, f"cannot reach {url}: {type(e).__name__}") from None
    status = response.status_code
    if status >= 400:
        response.close()
        if status in (404, 410):
            raise FileNotFoundError(errno.ENOENT, f"HTTP {status}", url)
        if status in (401, 403):
            raise PermissionError(errno.EACCES, f"HTTP {status} (credentials come from ~/.netrc)", url)
        if status in _TRANSIENT_HTTP:
            raise ConnectionResetError(errno.ECONNRESET, f"HTTP {status} from {url}")
        raise OSError(errno.EIO, f"HTTP {status}", url)
    # urllib3 checks the body against Content-Length and raises on a short one, rather than
    # returning a truncated tar as if it had ended; read1 returns what has arrived, so that the
    # samples before a cut reach the reader once.
    response.raw.enforce_content_length = True
    return _BodyReader(lambda n: response.raw.read1(n, decode_content=True), response.close, url, _NETWORK_ERRORS)


class _BodyReader(io.RawIOBase):
    """A response body read by ``read(n)``; an error of ``errors`` while reading (a connection
    dropped before the body's end) raises ConnectionResetError, which the stream retries."""

    def __init__(self, read: Callable[[int], bytes], close: Callable[[], None], url: str, errors: tuple):
        self._read, self._close, self._url, self._errors = read, close, url, errors

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            data = self._read(len(buffer))
        except self._errors as e:
            raise ConnectionResetError(errno.ECONNRESET, f"connection for {self._url} dropped: "
                                       f"{type(e).__name__}") from None
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._close()
        super().close()


_NETWORK_ERRORS = (OSError, urllib3.exceptions.HTTPError, http.client.HTTPException)


class _PipeReader(io.RawIOBase):
    """The standard output of a ``pipe:`` command; a non-zero exit raises ConnectionResetError at
    the end of the output, so a command that failed part-way is retried rather than taken as a
    short tar."""

    def __init__(self, spec: str):
        self._spec = spec
        # stderr to a file, not a pipe: a chatty command (curl -v) would fill a pipe nobody reads
        # until the end and block there, and the worker with it.
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(spec[len(PIPE):], shell=True, stdout=subprocess.PIPE,
                                      stderr=self._stderr, bufsize=0)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._proc.stdout.readinto(buffer)
        if n == 0:
            self._check()
        return n

    def _check(self) -> None:
        code = self._proc.wait()
        if code:
            self._stderr.seek(max(0, self._stderr.seek(0, os.SEEK_END) - 4096))
            err = self._stderr.read().decode(errors="replace").strip().splitlines()
            last = err[-1] if err else "no message"
            if code in (126, 127):  # the shell found no such command, or cannot run it: not the data
                raise OSError(errno.ENOEXEC, f"command exited {code}: {last}", self._spec)
            if re.search(r"no such file|not found|does not exist|404", last, re.IGNORECASE):
                raise FileNotFoundError(errno.ENOENT, f"command exited {code}: {last}", self._spec)
            raise ConnectionResetError(errno.ECONNRESET, f"command exited {code}: {last}")

    def close(self) -> None:
        if not self.closed and self._proc.poll() is None:
            self._proc.kill()
        if not self.closed:
            self._proc.wait()
            self._proc.stdout.close()
            self._stderr.close()
        super().close()


_s3_clients: dict[int, object] = {}
_s3_lock = threading.Lock()


def _s3_client():
    """This process's boto3 S3 client: a client must not cross a fork into the loader's workers.
    Its calls are thread-safe, but creating it is not (boto3's default session), hence the lock."""
    pid = os.getpid()
    with _s3_lock:
        return _s3_clients[pid] if pid in _s3_clients else _new_s3_client(pid)


def _new_s3_client(pid: int):
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise DistrainError("s3:// shards need boto3: pip install 'distrain[s3]'") from None
    custom = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    # One attempt per call: the stream's own retry reopens the shard and skips what it yielded.
    config = Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S, retries={"max_attempts": 1},
                    s3={"addressing_style": "path"} if custom else {})
    _s3_clients.clear()  # another process's (the parent's, before a fork)
    _s3_clients[pid] = boto3.client("s3", config=config)
    return _s3_clients[pid]


def _open_s3(url: str) -> IO[bytes]:
    client = _s3_client()  # first: without boto3 it raises the one-line "install distrain[s3]"
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    parts = urlsplit(url)
    try:
        body = client.get_object(Bucket=parts.netloc, Key=parts.path.lstrip("/"))["Body"]
    except NoCredentialsError:
        raise PermissionError(errno.EACCES, "no S3 credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
                              "~/.aws/credentials)", url) from None
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in ("NoSuchKey", "NoSuchBucket", "404") or status == 404:
            raise FileNotFoundError(errno.ENOENT, f"S3 {code or status}", url) from None
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403") or status == 403:
            raise PermissionError(errno.EACCES, f"S3 {code or status}", url) from None
        raise ConnectionResetError(errno.ECONNRESET, f"S3 {code or status} for {url}") from None
    except BotoCoreError as e:
        raise ConnectionResetError(errno.ECONNRESET, f"cannot reach S3 for {url}: {type(e).__name__}") from None
    return _BodyReader(body.read, body.close, url, (BotoCoreError, *_NETWORK_ERRORS))


def is_missing(url: str) -> bool:
    """Whether the store says it has no object at ``url`` (one HEAD request; S3: head_object).

    Only a definite "not there" counts: a transient failure or a ``pipe:`` command, which cannot
    be asked, returns False and is left to the reads (retried, then bad data).
    """
    if url.startswith(PIPE):
        return False
    if url.startswith(S3):
        client = _s3_client()  # first, as in _open_s3
        from botocore.exceptions import BotoCoreError, ClientError

        parts = urlsplit(url)
        try:
            client.head_object(Bucket=parts.netloc, Key=parts.path.lstrip("/"))
        except ClientError as e:
            return e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404
        except BotoCoreError:
            return False
        return False
    try:
        response = requests.head(url, allow_redirects=True, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
    except requests.RequestException:
        return False
    return response.status_code in (404, 410)


def upload_set(directory: str | Path, url: str, overwrite: bool = False) -> str:
    """Copy a shard set written locally (its tars, then its ``index.json``) to an S3 prefix.

    The index goes last, so that a reader never finds an index whose tars are not all there.

    Returns:
        The set's URL, ending in ``/``.

    Raises:
        DistrainError: ``url`` is not ``s3://``, the prefix already holds an index (and
            ``overwrite`` is off), or an upload fails, naming the object.
    """
    if not url.startswith(S3):
        raise DistrainError(f"--out {url}: shard sets are written to a local directory or to s3://bucket/prefix; "
                            "upload them elsewhere with the store's own tools")
    url = url if url.endswith("/") else url + "/"
    bucket, prefix = urlsplit(url).netloc, urlsplit(url).path.lstrip("/")
    client = _s3_client()  # first, as in _open_s3
    from botocore.exceptions import BotoCoreError, ClientError

    files = sorted(p for p in Path(directory).iterdir() if p.is_file() and p.name != "index.json")
    try:
        if not overwrite:
            try:
                client.head_object(Bucket=bucket, Key=prefix + "index.json")
                raise DistrainError(f"--out {url}: a shard set is already there (pass --overwrite to replace it)")
            except ClientError as e:
                if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
                    raise
        for path in [*files, Path(directory) / "index.json"]:
            client.upload_file(str(path), bucket, prefix + path.name)
    except (BotoCoreError, ClientError) as e:
        raise DistrainError(f"--out {url}: upload failed ({type(e).__name__}: {e})") from None
    return url


def _reason(exc: Exception) -> str:
    """The innermost line of a requests/urllib3 error, which wraps its cause several times."""
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return text.rsplit(": ", 1)[-1].strip("()'\"") or type(exc).__name__


@dataclass(frozen=True)
class ShardCache:
    """Remote shards kept on a node-local disk after their first read (``data.cache_dir``).

    Every rank and worker of a node may open the same shard at once: a lock file per shard lets
    one of them download it while the others wait, the download goes to a temporary file renamed
    into place when complete, so no reader ever sees a partial shard, and then they all read the
    local copy. After a download, the least recently used shards beyond ``max_bytes`` are deleted
    (a reader that has one open keeps reading it), and so are partial downloads older than
    :data:`STALE_PART_S` (left by a worker killed mid-download). The lock is ``flock``, so the
    directory must be on a local disk, not on NFS.
    """

    directory: str
    max_bytes: int

    def path(self, url: str) -> Path:
        """Where the copy of ``url`` is kept: a digest of the URL (the same name from two sets never
        collides) and the tar's name."""
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        return Path(self.directory) / f"{digest}-{tar_name(url) if url.endswith('.tar') else 'shard'}"

    def open(self, url: str) -> IO[bytes]:
        """The shard's local copy, downloaded first if this node has none.

        Raises:
            As :func:`open_remote`, while downloading; the partial download is removed.
        """
        path = self.path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:  # again if another process evicts the copy between its download and our open
            try:
                f = open(path, "rb")
            except FileNotFoundError:
                pass
            else:
                with contextlib.suppress(FileNotFoundError):  # evicted since: our open copy reads on
                    os.utime(path)  # its use, for the least-recently-used eviction
                return f
            with open(str(path) + ".lock", "a+b") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if path.exists():
                    continue
                part = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
                try:
                    with open_remote(url) as src, open(part, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    f = open(part, "rb")  # before the rename: an eviction right after it cannot take our copy
                    os.replace(part, path)
                finally:
                    part.unlink(missing_ok=True)
                self._evict(keep=path, kept_bytes=os.fstat(f.fileno()).st_size)
                return f

    def _evict(self, keep: Path, kept_bytes: int) -> None:
        entries = []
        now = time.time()
        for p in Path(self.directory).iterdir():
            try:
                st = p.stat()
            except FileNotFoundError:
                continue  # another process evicted it
            if p.name.endswith(".part"):
                # A download killed mid-way (a preempted job's worker exits without cleaning up)
                # leaves its part behind; a live one writes to it far more often than this.
                if now - st.st_mtime > STALE_PART_S:
                    p.unlink(missing_ok=True)
            elif p != keep and not p.name.startswith(".") and not p.name.endswith(".lock"):
                entries.append((st.st_mtime, st.st_size, p))
        total = kept_bytes + sum(size for _, size, _ in entries)
        for _, size, p in sorted(entries):
            if total <= self.max_bytes:
                break
            p.unlink(missing_ok=True)
            total -= size


def open_shard(url: str, cache: ShardCache | None = None) -> IO[bytes]:
    """A buffered binary reader of a shard, local or remote (through ``cache`` when given)."""
    if cache is not None and is_remote(url):
        return cache.open(url)
    if is_remote(url):
        return io.BufferedReader(open_remote(url), buffer_size=1 << 16)
    return open(url, "rb")
