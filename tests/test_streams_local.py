"""PacketStream over the in-process transport (two brokers) and as a local call (one broker):
uploads, downloads, aborts, early close, transfer_to atomicity, transforms, statistics and
bounded buffering with a slow consumer."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import trio

import nerve
from nerve import PacketStream
from nerve.errors import ClientError, NerveError, StreamClosedError

pytestmark = pytest.mark.anyio

CHUNK = 64 * 1024
WINDOW = 256 * 1024
SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * 1024 * 1024 + 17]
XOR_TABLE = bytes(b ^ 0x5A for b in range(256))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha(path: Path) -> str:
    return sha(path.read_bytes())


def new_stream() -> PacketStream:
    return PacketStream(window=WINDOW, max_chunk=CHUNK)


def write_random(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


async def wait_until(pred: Any, timeout: float = 3.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.005)


class Files(nerve.Service):
    name = "files"

    def __init__(self) -> None:
        self.producer_errors: list[BaseException] = []
        self.buffered: list[int] = []
        self.reader_stats: Any = None
        self.seen_errors: list[BaseException] = []
        self.release = trio.Event()

    @nerve.action
    async def sha(self, ctx: nerve.Context) -> dict[str, Any]:
        assert ctx.stream is not None
        h = hashlib.sha256()
        n = 0
        async for chunk in ctx.stream:
            assert 0 < len(chunk) <= CHUNK
            h.update(chunk)
            n += len(chunk)
        self.reader_stats = ctx.stream.statistics()
        return {"sha": h.hexdigest(), "size": n}

    @nerve.action
    async def slow_sha(self, ctx: nerve.Context) -> dict[str, Any]:
        assert ctx.stream is not None
        h = hashlib.sha256()
        while True:
            self.buffered.append(ctx.stream.statistics().bytes_buffered)
            chunk = await ctx.stream.receive()
            if not chunk:
                break
            h.update(chunk)
            await trio.sleep(0.003)
        return {"sha": h.hexdigest()}

    @nerve.action
    async def download(self, ctx: nerve.Context) -> PacketStream:
        return PacketStream.from_file(ctx.params["path"], window=WINDOW, max_chunk=CHUNK)

    @nerve.action
    async def read_until_error(self, ctx: nerve.Context) -> dict[str, Any]:
        assert ctx.stream is not None
        got = 0
        try:
            async for chunk in ctx.stream:
                got += len(chunk)
        except NerveError as exc:
            self.seen_errors.append(exc)
            return {"got": got, "cls": type(exc).__name__, "message": exc.message, "code": exc.code,
                    "type": exc.type, "data": exc.data}
        return {"got": got, "cls": None}

    @nerve.action
    async def fail_midway(self, ctx: nerve.Context) -> PacketStream:
        stream = new_stream()
        size = ctx.params["size"]

        async def produce() -> None:
            await stream.send(b"m" * size)
            await stream.abort(ClientError("producer gave up", 409, "GAVE_UP", {"at": size}))

        ctx.broker.start_soon(produce)
        return stream

    @nerve.action
    async def tiny(self, ctx: nerve.Context) -> PacketStream:
        """``count`` chunks of 16 bytes each (chunk i is 16 bytes of i % 251)."""

        async def chunks() -> Any:
            for i in range(ctx.params["count"]):
                yield bytes([i % 251]) * 16

        return PacketStream.from_iterable(chunks(), window=WINDOW, max_chunk=CHUNK)

    @nerve.action
    async def stall(self, ctx: nerve.Context) -> PacketStream:
        stream = new_stream()

        async def produce() -> None:
            await stream.send(b"s" * 1000)
            await self.release.wait()  # stalls until the test lets it go
            try:
                await stream.close()
            except NerveError:
                pass

        ctx.broker.start_soon(produce)
        return stream

    @nerve.action
    async def endless(self, ctx: nerve.Context) -> PacketStream:
        stream = new_stream()

        async def produce() -> None:
            try:
                while True:
                    await stream.send(b"e" * CHUNK)
            except BaseException as exc:
                self.producer_errors.append(exc)
                raise

        ctx.broker.start_soon(produce)
        return stream

    @nerve.action
    async def read_one_and_close(self, ctx: nerve.Context) -> int:
        assert ctx.stream is not None
        first = await ctx.stream.receive()
        await ctx.stream.close()
        return len(first)

    @nerve.action
    async def transform(self, ctx: nerve.Context) -> PacketStream:
        """Streaming transform: the response is produced while the request is read."""
        source = ctx.stream
        assert source is not None

        async def chunks() -> Any:
            async for chunk in source:
                yield chunk.translate(XOR_TABLE)

        return PacketStream.from_iterable(chunks(), window=WINDOW, max_chunk=CHUNK)

    @nerve.action
    async def transform_buffered(self, ctx: nerve.Context) -> PacketStream:
        """Reads the whole request first, then answers with a stream."""
        assert ctx.stream is not None
        data = (await ctx.stream.read_all()).translate(XOR_TABLE)

        async def chunks() -> Any:
            for i in range(0, len(data), 100_000):
                yield data[i:i + 100_000]

        return PacketStream.from_iterable(chunks(), window=WINDOW, max_chunk=CHUNK)


class Pair:
    """A client broker and a server broker hosting Files (the same broker when local)."""

    def __init__(self, remote: bool, prefix: str) -> None:
        self.files = Files()
        kw = {"max_chunk": CHUNK, "stream_window": WINDOW}
        self.client = nerve.Broker(f"{prefix}-client", services=[] if remote else [self.files], **kw)
        self.server = nerve.Broker(f"{prefix}-server", services=[self.files] if remote else [], **kw)

    async def __aenter__(self) -> Pair:
        await self.client.__aenter__()
        try:
            await self.server.__aenter__()
        except BaseException:
            await self.client.__aexit__(None, None, None)
            raise
        await self.client.wait_for_services("files")
        return self

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await self.server.__aexit__(*exc)
        finally:
            await self.client.__aexit__(*exc)


REMOTE = pytest.mark.parametrize("remote", [False, True], ids=["local", "remote"])


# --- upload and download ----------------------------------------------------------------


@REMOTE
@pytest.mark.parametrize("size", SIZES)
async def test_upload_from_file(remote: bool, size: int, tmp_path: Path) -> None:
    path = tmp_path / "up.bin"
    data = write_random(path, size)
    async with Pair(remote, "st-up") as p:
        stream = PacketStream.from_file(path, window=WINDOW, max_chunk=CHUNK)
        with trio.fail_after(20):
            res = await p.client.call("files.sha", stream=stream)
        assert res == {"sha": sha(data), "size": size}
        stats = stream.statistics()
        assert stats.bytes_sent == size
        assert p.files.reader_stats.bytes_received == size
        assert p.files.reader_stats.bytes_buffered == 0


@REMOTE
@pytest.mark.parametrize("size", SIZES)
async def test_download_transfer_to(remote: bool, size: int, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    data = write_random(src, size)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "copy.bin"
    async with Pair(remote, "st-down") as p:
        with trio.fail_after(20):
            reader = await p.client.call("files.download", {"path": str(src)})
            assert isinstance(reader, PacketStream)
            written = await reader.transfer_to(target)
        assert written == size
        assert file_sha(target) == sha(data)
        assert reader.statistics().bytes_received == size
        assert os.listdir(out_dir) == ["copy.bin"]  # no stray temporary file


@REMOTE
async def test_download_by_iteration_and_upload_by_send(remote: bool) -> None:
    data = os.urandom(5 * CHUNK + 123)
    async with Pair(remote, "st-iter") as p:
        stream = new_stream()

        async def produce() -> None:
            # Odd-sized writes: the reader must still see the bytes in order and whole.
            view = memoryview(data)
            for i in range(0, len(data), 50_000):
                await stream.send(view[i:i + 50_000])
            await stream.close()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            with trio.fail_after(20):
                res = await p.client.call("files.sha", stream=stream)
        assert res == {"sha": sha(data), "size": len(data)}
        assert stream.statistics().bytes_sent == len(data)


# --- failures ---------------------------------------------------------------------------


@REMOTE
async def test_producer_abort_reaches_the_request_reader_with_its_error(remote: bool) -> None:
    async with Pair(remote, "st-abort-up") as p:
        stream = new_stream()

        async def produce() -> None:
            await stream.send(b"x" * 1000)
            await stream.abort(ClientError("producer gave up", 409, "GAVE_UP", {"at": 1000}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            with trio.fail_after(10):
                res = await p.client.call("files.read_until_error", stream=stream)
        assert res["cls"] == "ClientError"
        assert res["message"] == "producer gave up"
        assert res["code"] == 409 and res["type"] == "GAVE_UP"
        assert res["data"] == {"at": 1000}
        assert res["got"] <= 1000
        with pytest.raises(StreamClosedError):
            await stream.send(b"more")


@REMOTE
async def test_producer_abort_reaches_the_response_reader_with_its_error(remote: bool) -> None:
    async with Pair(remote, "st-abort-down") as p:
        with trio.fail_after(10):
            reader = await p.client.call("files.fail_midway", {"size": 3 * CHUNK})
            got = 0
            with pytest.raises(ClientError) as info:
                async for chunk in reader:
                    got += len(chunk)
        exc = info.value
        assert type(exc) is ClientError
        assert exc.message == "producer gave up"
        assert exc.code == 409 and exc.type == "GAVE_UP"
        assert exc.data == {"at": 3 * CHUNK}
        assert got <= 3 * CHUNK
        # The failure sticks: reading again raises again (never a silent end of stream).
        with pytest.raises(ClientError):
            await reader.receive()


@REMOTE
async def test_reader_closing_early_makes_the_response_producer_fail(remote: bool) -> None:
    async with Pair(remote, "st-close-down") as p:
        with trio.fail_after(10):
            reader = await p.client.call("files.endless")
            first = await reader.receive()
            assert first
            await reader.close()
            await wait_until(lambda: p.files.producer_errors)
        assert isinstance(p.files.producer_errors[0], StreamClosedError)


@REMOTE
async def test_reader_closing_early_makes_the_request_producer_fail(remote: bool) -> None:
    async with Pair(remote, "st-close-up") as p:
        stream = new_stream()
        errors: list[BaseException] = []

        async def produce() -> None:
            try:
                for _ in range(1000):  # far more than a window: the reader stops first
                    await stream.send(b"u" * CHUNK)
            except StreamClosedError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            with trio.fail_after(10):
                assert await p.client.call("files.read_one_and_close", stream=stream) == CHUNK
                await wait_until(lambda: errors)
        assert isinstance(errors[0], StreamClosedError)
        assert stream.statistics().bytes_sent < 1000 * CHUNK


@REMOTE
async def test_failed_transfer_to_leaves_no_file(remote: bool, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "never.bin"
    async with Pair(remote, "st-fail-file") as p:
        with trio.fail_after(10):
            reader = await p.client.call("files.fail_midway", {"size": 2 * CHUNK + 5})
            with pytest.raises(ClientError, match="producer gave up"):
                await reader.transfer_to(target)
        assert not target.exists()
        assert os.listdir(out_dir) == []

        # A transfer cancelled midway (the producer stalls) leaves nothing either.
        with trio.fail_after(10):
            reader = await p.client.call("files.stall")
        with trio.move_on_after(0.2) as cs:
            await reader.transfer_to(target)
        assert cs.cancelled_caught
        assert os.listdir(out_dir) == []
        p.files.release.set()

        # And an existing file under the target name is not clobbered by a failure.
        target.write_bytes(b"precious")
        with trio.fail_after(10):
            reader = await p.client.call("files.fail_midway", {"size": 10})
            with pytest.raises(ClientError):
                await reader.transfer_to(target)
        assert target.read_bytes() == b"precious"
        assert os.listdir(out_dir) == ["never.bin"]


# --- request and response stream in one call --------------------------------------------


@REMOTE
@pytest.mark.parametrize("action", ["transform", "transform_buffered"])
async def test_transform_request_stream_to_response_stream(remote: bool, action: str, tmp_path: Path) -> None:
    path = tmp_path / "in.bin"
    data = write_random(path, 4 * WINDOW + 999)  # several windows: it has to flow both ways
    async with Pair(remote, "st-xform") as p:
        with trio.fail_after(20):
            out = await p.client.call(f"files.{action}",
                                      stream=PacketStream.from_file(path, window=WINDOW, max_chunk=CHUNK))
            assert isinstance(out, PacketStream)
            got = await out.read_all()
        assert len(got) == len(data)
        assert sha(got) == sha(data.translate(XOR_TABLE))


# --- statistics and memory --------------------------------------------------------------


@REMOTE
async def test_statistics_fields(remote: bool) -> None:
    async with Pair(remote, "st-stats") as p:
        stream = new_stream()
        fresh = stream.statistics()
        for key in ("bytes_sent", "bytes_received", "bytes_buffered", "credit", "chunks_sent", "chunks_received"):
            assert isinstance(getattr(fresh, key), int), key
        assert fresh.bytes_sent == fresh.bytes_received == fresh.bytes_buffered == fresh.chunks_sent == 0
        assert fresh.credit_wait == 0.0
        with pytest.raises(dataclasses.FrozenInstanceError):
            fresh.bytes_sent = 1  # type: ignore[misc]

        async def produce() -> None:
            await stream.send(b"q" * (2 * CHUNK + 7))
            mid = stream.statistics()
            assert mid.bytes_sent == 2 * CHUNK + 7 and mid.chunks_sent == 3
            assert 0 <= mid.credit <= WINDOW
            await stream.close()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            res = await p.client.call("files.sha", stream=stream)
        assert res["size"] == 2 * CHUNK + 7
        assert fresh.bytes_sent == 0  # a snapshot does not change
        assert p.files.reader_stats.bytes_received == 2 * CHUNK + 7
        assert p.files.reader_stats.chunks_received == 3
        assert p.files.reader_stats.bytes_sent == 0


@REMOTE
async def test_slow_request_reader_buffers_at_most_the_window(remote: bool) -> None:
    data = os.urandom(2 * 1024 * 1024)
    async with Pair(remote, "st-slow-up") as p:
        stream = new_stream()

        async def produce() -> None:
            await stream.send(data)  # as fast as credit allows
            await stream.close()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            with trio.fail_after(20):
                res = await p.client.call("files.slow_sha", stream=stream)
        assert res["sha"] == sha(data)
        peak = max(p.files.buffered)
        assert peak <= WINDOW, peak
        assert peak >= WINDOW // 2, "the producer should have run ahead of the slow reader"


@REMOTE
async def test_slow_response_reader_buffers_at_most_the_window(remote: bool, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    data = write_random(src, 2 * 1024 * 1024)
    async with Pair(remote, "st-slow-down") as p:
        with trio.fail_after(20):
            reader = await p.client.call("files.download", {"path": str(src)})
            h = hashlib.sha256()
            peak = 0
            while True:
                peak = max(peak, reader.statistics().bytes_buffered)
                chunk = await reader.receive()
                if not chunk:
                    break
                h.update(chunk)
                await trio.sleep(0.003)
        assert h.hexdigest() == sha(data)
        assert peak <= WINDOW, peak
        assert peak >= WINDOW // 2, "the producer should have run ahead of the slow reader"


@REMOTE
async def test_transfer_to_starts_writeback_batch_by_batch(remote: bool, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """transfer_to to a path asks the kernel to start writing each batch to disk as soon as it
    is written (so the fsync at the end has only the tail left): the ranges asked for are
    consecutive, cover the whole file and are each of the file being written."""
    import nerve.streams as streams_module

    ranges: list[tuple[int, int, int]] = []
    real = streams_module._start_writeback

    def spy(fileno: int, offset: int, length: int) -> None:
        ranges.append((os.fstat(fileno).st_ino, offset, length))
        real(fileno, offset, length)

    monkeypatch.setattr(streams_module, "_start_writeback", spy)
    size = 5 * WINDOW + 123
    src = tmp_path / "src.bin"
    data = write_random(src, size)
    target = tmp_path / "copy.bin"
    async with Pair(remote, "st-wb") as p:
        with trio.fail_after(20):
            reader = await p.client.call("files.download", {"path": str(src)})
            assert await reader.transfer_to(target) == size
    assert file_sha(target) == sha(data)
    assert {ino for ino, _, _ in ranges} == {target.stat().st_ino}  # (renamed into place)
    assert len(ranges) >= 2
    at = 0
    for _, offset, length in ranges:
        assert offset == at and length > 0
        at += length
    assert at == size


@REMOTE
async def test_transfer_to_writes_a_window_of_thousands_of_tiny_chunks(remote: bool, tmp_path: Path) -> None:
    """A window's worth of 16-byte chunks is more buffers than one writev takes (IOV_MAX,
    1024): transfer_to used to fail with EINVAL on such a batch."""
    count = 6000
    expected = b"".join(bytes([i % 251]) * 16 for i in range(count))
    target = tmp_path / "tiny.bin"
    async with Pair(remote, "st-tiny") as p:
        with trio.fail_after(20):
            reader = await p.client.call("files.tiny", {"count": count})
            await wait_until(lambda: reader.statistics().bytes_buffered >= 2000 * 16)  # > IOV_MAX chunks
            assert await reader.transfer_to(target) == len(expected)
    assert target.read_bytes() == expected
