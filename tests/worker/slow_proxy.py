"""A TCP proxy on 127.0.0.1 that forwards request bytes at a fixed rate, to make uploads slow."""

from __future__ import annotations

import asyncio
import re
import threading

CHUNK_BYTES = 16 * 1024
# The credential scope of an AWS Signature Version 4 Authorization header.
_CREDENTIAL_SCOPE = re.compile(rb"Credential=([^/\s]+)/\d{8}/([^/\s]+)/s3/aws4_request")


class SlowProxy:
    """Forwards connections to 127.0.0.1:target_port; client-to-server bytes go at bytes_per_s.

    Replies are not slowed, so downloads and small requests stay quick while uploads crawl.
    bytes_per_s None forwards at full speed. credential_scopes collects the (access key id,
    region) of each signed request seen in one read of the client's bytes.
    """

    def __init__(self, target_port: int, bytes_per_s: float | None) -> None:
        self.target_port = target_port
        self.bytes_per_s = bytes_per_s
        self.credential_scopes: list[tuple[str, str]] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def start(self) -> str:
        """Start listening on a free port; return the proxy's base URL."""
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self.port = future.result(10)
        return f"http://127.0.0.1:{self.port}"

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _handle(self, client_reader, client_writer) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(
                "127.0.0.1", self.target_port
            )
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            self._pipe(client_reader, server_writer, self.bytes_per_s, record=True),
            self._pipe(server_reader, client_writer, None, record=False),
            return_exceptions=True,
        )

    async def _pipe(self, reader, writer, bytes_per_s: float | None, record: bool) -> None:
        try:
            while chunk := await reader.read(CHUNK_BYTES):
                if record:
                    for match in _CREDENTIAL_SCOPE.finditer(chunk):
                        self.credential_scopes.append((match[1].decode(), match[2].decode()))
                writer.write(chunk)
                await writer.drain()
                if bytes_per_s:
                    await asyncio.sleep(len(chunk) / bytes_per_s)
        finally:
            writer.close()
