"""regmirror's memory while it streams a big blob from S3 into an empty local cache.

Starts ``moto_server`` and regmirror (S3 configured, empty data directory) on free
127.0.0.1 ports, writes a random blob (1 GiB by default) and a manifest linking it
straight into the bucket in registry:2's layout with boto3 (a multipart upload of
seeded random parts generated on the fly: no local copy of the blob), then GETs the
blob through regmirror, which fills it from S3 while streaming it. The body is hashed
and checked; regmirror's VmRSS is sampled from /proc every 50 ms. Then it GETs the blob
once more, now a local hit (sendfile), for comparison.

Prints the time, MB/s, peak sampled VmRSS and VmHWM. Exit status 1 when the digest is
wrong or the peak RSS is above ``--target-mib``. Everything is bounded (process start,
every read, the whole GET) and the temp directory (which ends up holding the filled
blob, and moto's spooled copy) is deleted at the end unless ``--keep``.

    python bench/s3_rss.py                 # 1 GiB, ~1-2 min on a small VM
    python bench/s3_rss.py --size-mib 256  # quicker look
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3
from botocore.config import Config

HOST = "127.0.0.1"
REGION = "us-east-1"
BUCKET = "bench"
PREFIX = "bench/root"
REPO = "bench/big"
MiB = 1024 * 1024
PART = 64 * MiB
READ = 1 * MiB
SAMPLE_EVERY = 0.05
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
READ_TIMEOUT = 60.0  # seconds without a byte from regmirror
GET_DEADLINE = 900.0  # seconds for one whole GET
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}
AWS_UNSET = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CA_BUNDLE",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def base_env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("REGMIRROR_") and k not in AWS_UNSET
    }
    env.update(AWS_ENV)
    return env


@dataclass
class Process:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 40) -> str:
        with contextlib.suppress(FileNotFoundError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)


@contextlib.contextmanager
def spawn(
    name: str, argv: list[str], env: dict[str, str], work: Path, ready_url: str
) -> Iterator[Process]:
    log = work / f"{name}.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work
        )
    proc = Process(name, popen, log)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if popen.poll() is not None:
                raise SystemExit(f"{name} exited with {popen.returncode}\n{proc.tail()}")
            try:
                with urllib.request.urlopen(ready_url, timeout=2.0):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise SystemExit(
                        f"{name} not ready after {READY_TIMEOUT:.0f}s\n{proc.tail()}"
                    ) from None
                time.sleep(0.1)
        yield proc
    finally:
        proc.stop()


def moto_argv(port: int) -> list[str]:
    script = shutil.which("moto_server")
    return [
        *([script] if script else [sys.executable, "-m", "moto.server"]),
        "-H",
        HOST,
        "-p",
        str(port),
    ]


def blob_key(hex_digest: str) -> str:
    return f"{PREFIX}/docker/registry/v2/blobs/sha256/{hex_digest[:2]}/{hex_digest}/data"


def repo_key(rest: str) -> str:
    return f"{PREFIX}/docker/registry/v2/repositories/{REPO}/{rest}"


def random_parts(size: int, seed: int = 1) -> Iterator[bytes]:
    rng = random.Random(seed)
    for offset in range(0, size, PART):
        yield rng.randbytes(min(PART, size - offset))


def seed_bucket(endpoint: str, size: int) -> str:
    """The random blob (multipart, parts generated on the fly), a config, a manifest
    linking both, and the tag ``latest``, in registry:2's layout. The blob's digest."""
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        config=Config(s3={"addressing_style": "path"}),
    )
    s3.create_bucket(Bucket=BUCKET)
    # Seeded random parts, generated twice (first to learn the digest, which names the
    # key, then to upload): no copy of the blob exists outside the bucket.
    sha = hashlib.sha256()
    for part in random_parts(size):
        sha.update(part)
    hex_digest = sha.hexdigest()
    key = blob_key(hex_digest)
    upload = s3.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
    try:
        parts = []
        for number, part in enumerate(random_parts(size), start=1):
            etag = s3.upload_part(
                Bucket=BUCKET, Key=key, UploadId=upload, PartNumber=number, Body=part
            )["ETag"]
            parts.append({"PartNumber": number, "ETag": etag})
        s3.complete_multipart_upload(
            Bucket=BUCKET, Key=key, UploadId=upload, MultipartUpload={"Parts": parts}
        )
    except BaseException:
        s3.abort_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload)
        raise

    def put(key: str, data: bytes) -> None:
        s3.put_object(Bucket=BUCKET, Key=key, Body=data)

    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}}
    ).encode()
    config_hex = hashlib.sha256(config).hexdigest()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "size": len(config),
                "digest": f"sha256:{config_hex}",
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "size": size,
                    "digest": f"sha256:{hex_digest}",
                }
            ],
        }
    ).encode()
    manifest_hex = hashlib.sha256(manifest).hexdigest()
    put(blob_key(config_hex), config)
    put(blob_key(manifest_hex), manifest)
    for hex_ in (config_hex, hex_digest):
        put(repo_key(f"_layers/sha256/{hex_}/link"), f"sha256:{hex_}".encode())
    link = f"sha256:{manifest_hex}".encode()
    put(repo_key(f"_manifests/revisions/sha256/{manifest_hex}/link"), link)
    put(repo_key(f"_manifests/tags/latest/index/sha256/{manifest_hex}/link"), link)
    put(repo_key("_manifests/tags/latest/current/link"), link)
    return hex_digest


@dataclass
class RssSampler:
    """VmRSS of ``pid`` every ``SAMPLE_EVERY`` seconds in a thread, in KiB."""

    pid: int
    samples: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def status(self, name: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
        return 0

    def run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                self.samples.append(self.status("VmRSS"))
            self._stop.wait(SAMPLE_EVERY)

    @contextlib.contextmanager
    def sampling(self) -> Iterator[None]:
        self.samples.clear()
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join()
            self._stop.clear()


def get_blob(port: int, hex_digest: str) -> tuple[int, float, str]:
    """GET the blob, hashing the body: (bytes, seconds, digest)."""
    connection = http.client.HTTPConnection(HOST, port, timeout=READ_TIMEOUT)
    started = time.monotonic()
    try:
        connection.request("GET", f"/v2/{REPO}/blobs/sha256:{hex_digest}")
        response = connection.getresponse()
        if response.status != 200:
            raise SystemExit(f"GET blob: HTTP {response.status}: {response.read(500)!r}")
        sha, total = hashlib.sha256(), 0
        while chunk := response.read(READ):
            sha.update(chunk)
            total += len(chunk)
            if time.monotonic() - started > GET_DEADLINE:
                raise SystemExit(f"GET blob: not done after {GET_DEADLINE:.0f}s ({total} bytes)")
        return total, time.monotonic() - started, sha.hexdigest()
    finally:
        connection.close()


def mib(kib: int) -> float:
    return kib / 1024


def run(args: argparse.Namespace, work: Path) -> int:
    size = args.size_mib * MiB
    env = base_env()
    moto_port, port = free_port(), free_port()
    moto_tmp = work / "moto-tmp"
    moto_tmp.mkdir()
    endpoint = f"http://{HOST}:{moto_port}"
    with spawn(
        "moto", moto_argv(moto_port), {**env, "TMPDIR": str(moto_tmp)}, work, f"{endpoint}/"
    ):
        started = time.monotonic()
        hex_digest = seed_bucket(endpoint, size)
        print(
            f"seeded s3://{BUCKET}/{PREFIX}: {args.size_mib} MiB blob sha256:{hex_digest[:16]}… "
            f"(boto3 multipart, direct) in {time.monotonic() - started:.1f}s",
            flush=True,
        )
        mirror_env = {
            **env,
            "REGMIRROR_S3__BUCKET": BUCKET,
            "REGMIRROR_S3__PREFIX": PREFIX,
            "REGMIRROR_S3__ENDPOINT_URL": endpoint,
            "REGMIRROR_S3__PATH_STYLE": "true",
            "REGMIRROR_S3__REGION": REGION,
        }
        argv = [
            sys.executable,
            "-m",
            "regmirror",
            "serve",
            "--listen",
            f"{HOST}:{port}",
            "--data-dir",
            str(work / "data"),
            "--log-level",
            "WARNING",
        ]
        with spawn("regmirror", argv, mirror_env, work, f"http://{HOST}:{port}/v2/") as mirror:
            sampler = RssSampler(mirror.process.pid)
            before = sampler.status("VmRSS")
            with sampler.sampling():
                nbytes, seconds, got = get_blob(port, hex_digest)
            peak, hwm = max(sampler.samples, default=0), sampler.status("VmHWM")
            with sampler.sampling():
                cached_bytes, cached_seconds, cached_got = get_blob(port, hex_digest)
            cached_peak = max(sampler.samples, default=0)
            logs = mirror.tail()

    ok = got == hex_digest and cached_got == hex_digest and nbytes == cached_bytes == size
    print(
        f"fill from S3 : {nbytes / MiB:,.0f} MiB in {seconds:.1f}s = {nbytes / seconds / 1e6:,.0f} MB/s, "
        f"digest {'ok' if got == hex_digest else 'WRONG'}"
    )
    print(
        f"regmirror RSS: {mib(before):.0f} MiB before, peak {mib(peak):.0f} MiB sampled "
        f"({len(sampler.samples)} samples, one per {seconds / max(len(sampler.samples), 1) * 1000:.0f} ms), VmHWM {mib(hwm):.0f} MiB "
        f"(target < {args.target_mib} MiB)"
    )
    print(
        f"local hit    : {cached_bytes / MiB:,.0f} MiB in {cached_seconds:.1f}s = "
        f"{cached_bytes / cached_seconds / 1e6:,.0f} MB/s, peak RSS {mib(cached_peak):.0f} MiB, "
        f"digest {'ok' if cached_got == hex_digest else 'WRONG'}"
    )
    if not ok:
        print(f"FAIL: wrong bytes\n{logs}")
        return 1
    if mib(max(peak, hwm)) >= args.target_mib:
        print(f"FAIL: peak RSS {mib(max(peak, hwm)):.0f} MiB >= {args.target_mib} MiB")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=1024, help="blob size in MiB (1024)")
    parser.add_argument("--target-mib", type=int, default=150, help="peak RSS to stay under (150)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where to make the temp dir")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, filled blob)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="regmirror-s3-rss-", dir=args.work_dir))
    try:
        return run(args, work)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
