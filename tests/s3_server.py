"""A real S3-compatible server for the object store tests: moto's standalone
server (`moto_server`, from PyPI's moto[server]) on 127.0.0.1, checking SigV4
signatures against an IAM user it is given, plus a TCP proxy that breaks
connections on purpose.

scripts/bootstrap installs moto[server] into its own venv, `.venv-moto`, so
that neither test venv gets moto's newer botocore: the client under test is
each venv's own (Debian 12's 1.29 or PyPI's). `LLMUX_TEST_MOTO_SERVER` names
another `moto_server`.

The server's fixtures skip (with the reason) only where moto_server or
botocore is missing; as root that is a failure to be fixed, not a pass.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ports import free_port

ROOT = Path(__file__).resolve().parent.parent
MOTO_SERVER = os.environ.get("LLMUX_TEST_MOTO_SERVER") or str(ROOT / ".venv-moto" / "bin" / "moto_server")
REGION = "us-east-1"
POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}


def unavailable_reason() -> str | None:
    try:
        import botocore  # noqa: F401
    except ImportError:
        return "botocore is not installed in this venv (scripts/bootstrap installs it: llmux[s3])"
    if not os.access(MOTO_SERVER, os.X_OK):
        return (f"{MOTO_SERVER} is missing: scripts/bootstrap installs moto[server] into .venv-moto "
                "(or set LLMUX_TEST_MOTO_SERVER)")
    return None




def client(service: str, endpoint: str, access_key: str, secret_key: str) -> Any:
    import botocore.config
    import botocore.session

    return botocore.session.Session().create_client(
        service, endpoint_url=endpoint, region_name=REGION, aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=botocore.config.Config(signature_version="s3v4", s3={"addressing_style": "path"},
                                      retries={"mode": "standard", "total_max_attempts": 1}))


@dataclass
class S3Server:
    """One moto_server process; requests must be signed with `access_key`/`secret_key`."""

    process: subprocess.Popen
    endpoint: str
    access_key: str = ""
    secret_key: str = ""

    @classmethod
    def start(cls, log_path: Path) -> "S3Server":
        port = free_port()
        log = open(log_path, "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        process = subprocess.Popen([MOTO_SERVER, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log,
                                   env=env, start_new_session=True)
        server = cls(process, f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(server.endpoint + "/moto-api/", timeout=2).read()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    server.stop()
                    raise RuntimeError(f"moto_server did not start (see {log_path})")
                time.sleep(0.1)
        server._enable_auth()
        return server

    def _enable_auth(self) -> None:
        """An IAM user with s3:* and its key; from then on moto checks every signature."""
        iam = client("iam", self.endpoint, "setup", "setup")
        iam.create_user(UserName="llmux")
        key = iam.create_access_key(UserName="llmux")["AccessKey"]
        iam.put_user_policy(UserName="llmux", PolicyName="s3", PolicyDocument=json.dumps(POLICY))
        self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
        request = urllib.request.Request(self.endpoint + "/moto-api/reset-auth", data=b"0", method="POST",
                                         headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=10).read()

    def s3(self, endpoint: str | None = None) -> Any:
        return client("s3", endpoint or self.endpoint, self.access_key, self.secret_key)

    def new_bucket(self) -> str:
        name = f"llmux-{uuid.uuid4().hex[:12]}"
        self.s3().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for page in self.s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for entry in page.get("Contents", []):
                out[entry["Key"]] = entry
        return out

    def pending_uploads(self, bucket: str) -> list[str]:
        return [u["Key"] for u in self.s3().list_multipart_uploads(Bucket=bucket).get("Uploads", [])]

    def pause(self) -> None:
        """SIGSTOP: the server stops answering (connections queue, reads time out)."""
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.resume()
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class FaultProxy:
    """127.0.0.1:port -> the server; `cut(direction, after_bytes, times)` closes the
    next `times` connections that carry more than `after_bytes` in `direction`
    ("up": client to server, "down": server to client)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._rule: tuple[str, int, int] | None = None
        self.cuts = 0
        self.bytes = {"up": 0, "down": 0}
        self.range_requests: list[str] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self, direction: str, after_bytes: int, times: int = 1) -> None:
        with self._lock:
            self._rule = (direction, after_bytes, times)

    def _take_cut(self, direction: str, count: int) -> bool:
        with self._lock:
            if self._rule is None or self._rule[0] != direction or count <= self._rule[1]:
                return False
            d, after, times = self._rule
            self._rule = (d, after, times - 1) if times > 1 else None
            self.cuts += 1
            return True

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for src, dst, direction in ((conn, upstream, "up"), (upstream, conn, "down")):
                threading.Thread(target=self._pump, args=(src, dst, direction, conn, upstream), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str, *both: socket.socket) -> None:
        count = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if direction == "up":
                    for line in data.split(b"\r\n"):
                        if line.lower().startswith(b"range:"):
                            with self._lock:
                                self.range_requests.append(line.decode(errors="replace"))
                count += len(data)
                with self._lock:
                    self.bytes[direction] += len(data)
                if self._take_cut(direction, count):
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in both:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._closed = True
        self.listener.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    server = S3Server.start(tmp_path_factory.mktemp("moto") / "moto_server.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fault_proxy(s3_server):
    proxy = FaultProxy(int(s3_server.endpoint.rsplit(":", 1)[1]))
    try:
        yield proxy
    finally:
        proxy.close()
