"""A client of the server's streaming protocol (``stream_client.py``, tests and the benchmark use it).

:func:`stream_audio` sends 16 kHz mono PCM over ``/v1/stream`` in messages of ``chunk_ms``, at
real-time pace (or faster), while a second thread receives the frames; it returns every message's
content and when it arrived, so callers can check the order and measure latency.
"""
from __future__ import annotations

import json
import socket
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

import audio
from lipsync.core.errors import Wav2LipError


class ClientError(Wav2LipError, RuntimeError):
    """The server refused the stream or could not be reached; the message says why."""


def pcm16(wav: np.ndarray) -> np.ndarray:
    """(samples,) float in [-1, 1] -> (samples,) int16 little-endian PCM (clipped)."""
    return np.round(np.clip(np.asarray(wav, np.float32), -1.0, 1.0) * 32767).astype("<i2")


def ws_url(base: str, avatar_id: str, token: Optional[str] = None) -> str:
    """``http://host:port`` (or ws://...) -> ``ws://host:port/v1/stream?avatar_id=ID[&token=T]``."""
    parts = urllib.parse.urlsplit(base if "://" in base else "http://" + base)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    query = {"avatar_id": avatar_id}
    if token:
        query["token"] = token
    return urllib.parse.urlunsplit((scheme, parts.netloc, "/v1/stream", urllib.parse.urlencode(query), ""))


def get_json(base: str, path: str, token: Optional[str] = None, timeout: float = 30.0) -> dict:
    """GET ``base + path`` as JSON (with the token as a Bearer header); raises ClientError on an
    HTTP error, with the server's ``detail``."""
    url = base.rstrip("/") + path
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read().decode("utf-8")).get("detail", "")
        except ValueError:
            detail = ""
        raise ClientError(f"{url}: HTTP {exc.code} {detail}".strip()) from None
    except OSError as exc:
        raise ClientError(f"cannot reach {url}: {exc}") from None


@dataclass
class StreamResult:
    """What one stream brought back.

    ``frames``: talk frame index -> JPEG bytes; ``order``: talk frame indices in arrival order;
    ``received_at``: index -> client clock (``time.monotonic()`` seconds) at arrival; ``idle``:
    idle frames received; ``end``: the end message (None if none came); ``error``: the error
    message (None if none); ``sent``: (client clock, samples sent so far) after each message;
    ``close_code``: the WebSocket close code.
    """

    frames: Dict[int, bytes] = field(default_factory=dict)
    order: List[int] = field(default_factory=list)
    received_at: Dict[int, float] = field(default_factory=dict)
    idle: int = 0
    end: Optional[dict] = None
    error: Optional[str] = None
    sent: List[Tuple[float, int]] = field(default_factory=list)
    close_code: Optional[int] = None

    def latencies(self, fps: float) -> np.ndarray:
        """Seconds from sending the PCM message that completed frame ``k``'s mel window (the one that
        brought sample ``200 * (int(80 k / fps) + 15) + 399``) to receiving frame ``k``, for the frames
        whose window that audio completes (not the last few, which wait for the end message)."""
        if not self.sent:
            return np.zeros(0)
        times = np.array([t for t, _ in self.sent])
        counts = np.array([n for _, n in self.sent])
        out = []
        for k, t_recv in self.received_at.items():
            need = audio.HOP_SIZE * (audio.frame_to_mel_start(k, fps) + audio.MEL_STEP_SIZE - 1) + audio.N_FFT // 2
            i = int(np.searchsorted(counts, need))   # the first message after which that many samples were sent
            if i < len(counts):
                out.append(t_recv - times[i])
        return np.asarray(out)


def stream_audio(url: str, avatar_id: str, pcm: np.ndarray, chunk_ms: float = 100.0, speed: float = 1.0,
                 token: Optional[str] = None, on_frame: Optional[Callable[[int], None]] = None,
                 stop_after: Optional[int] = None,
                 before_end: Optional[Callable[[], None]] = None, open_timeout: float = 60.0,
                 timeout: float = 600.0, recv_buffer: Optional[int] = None) -> StreamResult:
    """Stream ``pcm`` ((samples,) int16 at 16 kHz) to ``url`` (the server's base URL) for ``avatar_id``.

    ``chunk_ms``: milliseconds of audio per message; ``speed``: 1 = real-time pace, 2 = twice as
    fast, 0 = as fast as the server reads. ``on_frame(index)``: called after each talk frame is read;
    nothing more is read while it runs (a slow reader sleeps or waits in it). ``recv_buffer``: bytes of socket receive buffer, and one message queued in the
    client, so that a slow reader's backlog stays on the server instead of in this process.
    ``stop_after``: disconnect abruptly after this many talk frames (a client that vanishes). ``before_end``: called before ``{"type": "end"}`` is sent. Raises ClientError
    when the handshake is refused (with the HTTP status) or the server cannot be reached.
    """
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    headers = {"Authorization": f"Bearer {token}"} if token else None
    extra = {}
    try:
        if recv_buffer is not None:
            host, port = urllib.parse.urlsplit(url if "://" in url else "http://" + url).netloc.rsplit(":", 1)
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer)  # before connect: sets the window
            sock.connect((host.strip("[]"), int(port)))
            extra = {"sock": sock, "max_queue": 1}
        with connect(ws_url(url, avatar_id), additional_headers=headers, open_timeout=open_timeout,
                     max_size=None, close_timeout=5, **extra) as ws:
            return _exchange(ws, np.ascontiguousarray(pcm, dtype="<i2"), chunk_ms, speed, on_frame, stop_after,
                             before_end, timeout)
    except InvalidStatus as exc:
        body = exc.response.body.decode("utf-8", "replace") if exc.response.body else ""
        try:
            body = json.loads(body).get("detail", body)
        except ValueError:
            pass
        raise ClientError(f"the server refused the stream: HTTP {exc.response.status_code} {body}".strip()) from None
    except OSError as exc:
        raise ClientError(f"cannot reach {url}: {exc}") from None


def _exchange(ws, data: np.ndarray, chunk_ms: float, speed: float, on_frame, stop_after, before_end,
              timeout: float) -> StreamResult:
    """Send ``data`` from a thread while reading the server's messages here (see :func:`stream_audio`)."""
    from websockets.exceptions import ConnectionClosed

    result = StreamResult()
    step = max(1, int(round(audio.SAMPLE_RATE * chunk_ms / 1000.0)))
    stop = threading.Event()

    def send():
        t0 = time.monotonic()
        try:
            for k in range(0, len(data), step):
                if stop.is_set():
                    return
                if speed > 0:
                    wait = t0 + k / audio.SAMPLE_RATE / speed - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                ws.send(data[k:k + step].tobytes())
                result.sent.append((time.monotonic(), min(len(data), k + step)))
            if before_end is not None:
                before_end()
            ws.send(json.dumps({"type": "end"}))
        except (ConnectionClosed, OSError):
            pass

    sender = threading.Thread(target=send, name="stream-send", daemon=True)
    sender.start()
    deadline = time.monotonic() + timeout
    header: Optional[dict] = None
    try:
        while time.monotonic() < deadline:
            try:
                msg = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
            except (ConnectionClosed, TimeoutError):
                break
            if isinstance(msg, str):
                header = json.loads(msg)
                kind = header.get("type")
                if kind == "end":
                    result.end = header
                elif kind == "error":
                    result.error = header.get("message", "")
                continue
            if header is None:
                raise ClientError("the server sent a binary message without its header")
            if header.get("type") == "frame":
                i = int(header["index"])
                result.frames[i] = msg
                result.order.append(i)
                result.received_at[i] = time.monotonic()
                if stop_after is not None and len(result.order) >= stop_after:
                    stop.set()
                    ws.socket.close()  # vanish: no close handshake
                    break
                if on_frame is not None:
                    on_frame(i)
            else:
                result.idle += 1
            header = None
    finally:
        stop.set()
        sender.join(10)
        result.close_code = ws.close_code
    return result


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG bytes -> (H, W, 3) uint8 BGR; raises ClientError for bytes that are not a JPEG."""
    import cv2

    frame = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if frame is None:
        raise ClientError("the server sent a frame that is not a JPEG")
    return frame
