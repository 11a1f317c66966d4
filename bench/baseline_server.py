"""The single-process peer for bench/s3_trunk.py: a minimal aiohttp S3-ish file server.

PUT /bucket/key writes the body durably (temp file, fsync, rename, fsync directory -
the same guarantee Cohort gives) and GET returns it.  No auth, no metadata, no cluster:
it is what "one process and a disk" costs, so the ratio against it shows the overhead of
Cohort's three layers.  Prints ``READY host:port``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import uuid
from pathlib import Path

from aiohttp import web


def main() -> None:
    root = Path(sys.argv[1])
    root.mkdir(parents=True, exist_ok=True)

    def write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)

    async def handle(request: web.Request) -> web.StreamResponse:
        path = root / request.match_info["tail"].replace("..", "_")
        if request.method == "PUT":
            data = await request.read()
            await asyncio.to_thread(write, path, data)
            return web.Response(headers={"ETag": f'"{hashlib.md5(data).hexdigest()}"'})
        if request.method == "GET":
            try:
                data = await asyncio.to_thread(path.read_bytes)
            except FileNotFoundError:
                return web.Response(status=404)
            return web.Response(body=data)
        return web.Response(status=405)

    async def serve() -> None:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(f"READY 127.0.0.1:{port}", flush=True)
        await asyncio.Event().wait()

    import uvloop

    uvloop.run(serve())


if __name__ == "__main__":
    main()
