"""Object store transfers: throughput and the client's peak memory against moto_server.

    .venv/bin/python benchmarks/object_store_transfer.py [--mib 256]

Uploads one image set (one file of --mib MiB plus small files) to a local
moto_server and downloads it into a fresh directory, each in a fresh process,
and prints MiB/s, the client's CPU time as a share of the wall time (well
under 100 % means the server, not llmux's client, sets the pace) and the peak
RSS growth of that process: streaming keeps the growth independent of the
image size. (moto keeps objects in its own memory; only the client is measured.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

CHILD = r"""
import asyncio, json, resource, sys, time
from pathlib import Path
from llmuxd.checkpoint.catalogue import ImageCatalogue
from llmuxd.checkpoint.store import ObjectStore, TransferSettings
from llmuxd.config import Config
mode, images, store = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
config = Config.from_dict({"checkpoint": {"images_dir": str(images), "object_store": store}})
objstore = ObjectStore(config.checkpoint.object_store, settings=TransferSettings(progress_interval=1e9),
                       report=lambda e: None)
catalogue = ImageCatalogue(images)
usage = resource.getrusage(resource.RUSAGE_SELF)
before, cpu_before = usage.ru_maxrss, usage.ru_utime + usage.ru_stime
start = time.monotonic()
if mode == "upload":
    m = catalogue.load("bench")
    asyncio.run(objstore.publish("bench", catalogue.images_path("bench"), {}, dict(m.checksums)))
else:
    async def get():
        _, d = await objstore.fetch("bench", catalogue.model_dir("bench"))
        catalogue.install("bench", d)
    asyncio.run(get())
took = time.monotonic() - start
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": took, "rss_growth_mib": (usage.ru_maxrss - before) / 1024,
                  "cpu_seconds": usage.ru_utime + usage.ru_stime - cpu_before}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=256)
    args = parser.parse_args()
    from s3_server import S3Server
    from llmuxd.checkpoint.catalogue import ImageCatalogue, Manifest

    with tempfile.TemporaryDirectory() as tmp:
        server = S3Server.start(Path(tmp) / "moto.log")
        try:
            bucket = server.new_bucket()
            store = {"endpoint": server.endpoint, "bucket": bucket, "access_key": server.access_key,
                     "secret_key": server.secret_key}
            catalogue = ImageCatalogue(Path(tmp) / "a")
            staging = catalogue.stage("bench")
            with open(staging / "pages-1.img", "wb") as f:
                for _ in range(args.mib):
                    f.write(os.urandom(1 << 20))
            for i in range(20):
                (staging / f"core-{i}.img").write_bytes(os.urandom(4096))
            catalogue.commit("bench", staging, Manifest(model="bench", model_path="/m", config_hash="", config={},
                                                        eviction="discard+checkpoint"))
            for mode, images in (("upload", Path(tmp) / "a"), ("download", Path(tmp) / "b")):
                out = subprocess.run([sys.executable, "-c", CHILD, mode, str(images), json.dumps(store)],
                                     capture_output=True, text=True, check=True).stdout
                result = json.loads(out)
                print(f"{mode:8s} {args.mib} MiB: {args.mib / result['seconds']:7.1f} MiB/s, "
                      f"client CPU {result['cpu_seconds'] / result['seconds']:.0%} of the wall time, "
                      f"client peak RSS growth {result['rss_growth_mib']:.0f} MiB")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
