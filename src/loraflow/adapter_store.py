"""The LoRA store Ray Serve LLM loads adapters from: an s3:// prefix with one folder per registered
version, named `<registered model>-v<version>` and never rewritten (each replica caches an adapter
by name and would keep serving stale weights from a rewritten folder).

Ray 2.60 accepts only cloud paths for dynamic LoRA loading, so the embedded default runs an
S3-compatible server (moto's, from PyPI) on loopback; a real bucket is used when configured.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loraflow import registry
from loraflow.errors import UserError

ADAPTER_CONFIG = registry.ADAPTER_CONFIG  # uploaded last: its presence marks a complete folder

LOCAL_BUCKET = "loraflow-adapters"


class LoraStore:
    def __init__(self, uri: str, settings: dict[str, str] | None = None):
        """`settings`: the S3 environment variables its readers need (endpoint, region; the local
        server's made-up credentials), also handed to Ray's processes; default: this environment's
        endpoint and region (s3_settings), credentials from each machine's own environment or role."""
        if not uri.startswith("s3://"):
            raise UserError(f"LoRA store {uri!r} must be an s3:// URI "
                            "(Ray Serve LLM loads adapters from cloud storage).")
        self.uri = uri.rstrip("/")
        self.bucket, _, prefix = self.uri[len("s3://"):].partition("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self.settings = settings if settings is not None else s3_settings()

    def _s3(self):
        import boto3  # what settings leave out comes from the environment

        given = self.settings.get
        return boto3.client("s3", endpoint_url=given("AWS_ENDPOINT_URL_S3"), region_name=given("AWS_REGION"),
                            aws_access_key_id=given("AWS_ACCESS_KEY_ID"),
                            aws_secret_access_key=given("AWS_SECRET_ACCESS_KEY"))

    def has(self, adapter: str) -> bool:
        listed = self._s3().list_objects_v2(Bucket=self.bucket, Prefix=f"{self.prefix}{adapter}/{ADAPTER_CONFIG}")
        return listed.get("KeyCount", 0) > 0

    def adapters(self) -> list[str]:
        """Complete adapter folders in the store."""
        found = []
        for page in self._s3().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
            for item in page.get("Contents", []):
                parts = item["Key"][len(self.prefix):].split("/")
                if len(parts) == 2 and parts[1] == ADAPTER_CONFIG:
                    found.append(parts[0])
        return sorted(found)

    def listing(self, adapter: str) -> dict[str, str]:
        """The store's objects of one adapter folder, {relative key: "ETag size"}: any rewrite of a
        file changes it."""
        folder = f"{self.prefix}{adapter}/"
        return {item["Key"][len(folder):]: f"{item['ETag']} {item['Size']}"
                for page in self._s3().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder)
                for item in page.get("Contents", [])}

    def publish(self, version) -> str:
        """Copy a registered version's adapter into the store once, checked against the digests
        recorded at registration; returns its adapter id."""
        name = registry.adapter_id(version)
        label = f"{version.name} v{version.version}"
        with tempfile.TemporaryDirectory() as tmp:
            local = registry.download_adapter(version.source, tmp, label)
            registry.check_digests(version, local, f"the artifact store ({version.source})")
            return self.upload(name, local)

    def upload(self, name: str, local: Path) -> str:
        """Copy a local adapter folder into the store as `name`; a folder already there must hold
        the same files (it is never rewritten: replicas cache adapters by name)."""
        if self.has(name):
            with tempfile.TemporaryDirectory() as tmp:
                stored = registry.file_digests(self.download(name, Path(tmp)))
            if stored != registry.file_digests(local):
                raise UserError(f"The LoRA store's copy of {name} ({self.uri}/{name}) differs from the registered "
                                "adapter: it was changed after publishing. Delete that folder so that it is "
                                "published again, and find out who changed it.")
            return name
        files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: p.name == ADAPTER_CONFIG)
        s3 = self._s3()
        for path in files:
            s3.upload_file(str(path), self.bucket, f"{self.prefix}{name}/{path.relative_to(local).as_posix()}")
        return name

    def download(self, name: str, dst: Path) -> Path:
        """The store's copy of adapter `name`, in dst. Every key is checked before anything is
        written: a key is the store's to choose, and `NAME//etc/x` or `NAME/../x` would otherwise
        write outside dst."""
        s3 = self._s3()
        folder = f"{self.prefix}{name}/"
        keys = [item["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder)
                for item in page.get("Contents", [])]
        targets = [(key, _inside(dst, key[len(folder):], f"{self.uri}/{name}")) for key in keys]
        for key, target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(self.bucket, key, str(target))
        return dst


def _inside(dst: Path, relative: str, where: str) -> Path:
    """dst/relative, refused unless every segment is a plain name (no empty, `.` or `..` segment)."""
    parts = relative.split("/")
    target = dst.joinpath(*parts) if all(part not in ("", ".", "..") for part in parts) else None
    if target is None or not target.resolve().is_relative_to(dst.resolve()):
        raise UserError(f"The LoRA store's folder {where} holds the key {relative!r}, which is not a plain path "
                        "inside it: nothing was downloaded. Delete that object; only loraflow should write there.")
    return target


def s3_settings() -> dict[str, str]:
    """The S3 endpoint and region from this environment, for Ray workers' runtime_env (Ray's LoRA
    downloader needs them there, ray issue 55502). Credentials are not copied: runtime_env is shown
    by Ray's dashboard and state API, so nodes get theirs from their own environment or role."""
    return {k: os.environ[k] for k in ("AWS_REGION", "AWS_ENDPOINT_URL_S3") if k in os.environ}


@contextlib.contextmanager
def moto_s3_server(port: int | None = None):
    """moto's S3-compatible server (real HTTP, the S3 wire protocol) on 127.0.0.1, on `port` or a
    free one; yields its endpoint URL."""
    if port is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    # As a module of this interpreter: the moto_server script exists only where pip put console scripts.
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the local S3 server (moto_server) did not start on port {port}")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextlib.contextmanager
def local_s3_server():
    """Start moto's S3 server and yield an empty LoRA store in it. This process's own AWS settings
    are left alone (they may point the artifact store at a real S3): the store carries its endpoint."""
    with moto_s3_server() as endpoint:
        # Credentials are required by the S3 protocol; moto accepts any. Ray's S3 reader needs a region.
        store = LoraStore(f"s3://{LOCAL_BUCKET}/adapters", {
            "AWS_ENDPOINT_URL_S3": endpoint, "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "loraflow", "AWS_SECRET_ACCESS_KEY": "loraflow"})
        store._s3().create_bucket(Bucket=LOCAL_BUCKET)
        yield store
