"""Server memory while a large file is uploaded: the multipart body must stream to disk.

Starts `tunehouse serve` in a subprocess on a temporary home, uploads a generated file of --gb GiB
through a streaming HTTP client (so the client does not hold it either), and prints the server's
resident memory before, at its peak during the upload (VmHWM), and after.

    python bench/upload_memory.py --gb 1
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx

CHUNK = 1 << 20


def rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0)
    args = ap.parse_args()
    size = int(args.gb * (1 << 30))

    with tempfile.TemporaryDirectory() as tmp:
        home, port, key = Path(tmp) / "home", free_port(), "sk-bench-" + secrets.token_hex(8)
        env = {**os.environ, "TUNEHOUSE_ADMIN_KEY": key, "TUNEHOUSE_MAX_UPLOAD_BYTES": str(size + CHUNK)}
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tunehouse",
                "serve",
                "--port",
                str(port),
                "--home",
                str(home),
                "--no-worker",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(300):
                try:
                    httpx.get(f"{base}/health", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            before = rss_kb(server.pid, "VmRSS")
            boundary = "tunehousebench" + secrets.token_hex(8)
            line = (
                b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
            )

            def body():
                yield (
                    f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
                    f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
                    "Content-Type: application/octet-stream\r\n\r\n"
                ).encode()
                block = line * (CHUNK // len(line))
                sent = 0
                while sent < size:
                    piece = block[: min(len(block), size - sent)]
                    sent += len(piece)
                    yield piece
                yield f"\r\n--{boundary}--\r\n".encode()

            t0 = time.time()
            r = httpx.post(
                f"{base}/v1/files",
                content=body(),
                timeout=600,
                headers={
                    "Authorization": f"Bearer {key}",
                    "Content-Type": f"multipart/form-data; boundary={boundary}",
                },
            )
            took = time.time() - t0
            peak, after = rss_kb(server.pid, "VmHWM"), rss_kb(server.pid, "VmRSS")
            r.raise_for_status()
            stored = r.json()["bytes"]
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"uploaded {stored / (1 << 30):.2f} GiB in {took:.1f} s ({stored / took / (1 << 20):.0f} MiB/s)")
    print(f"server RSS before {before / 1024:.0f} MB, peak {peak / 1024:.0f} MB, after {after / 1024:.0f} MB")
    print(f"peak growth during the upload: {(peak - before) / 1024:.0f} MB (target < 200 MB)")
    return 0 if stored == size and (peak - before) < 200 * 1024 else 1


if __name__ == "__main__":
    sys.exit(main())
