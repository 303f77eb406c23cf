"""Real-time lip-sync server: stream speech in, get the talking face out, many sessions at once.

    python serve.py --checkpoint_path checkpoints/wav2lip_gan.pth            # http://127.0.0.1:8000/
    python serve.py --checkpoint_path G.pth --host 0.0.0.0 --token SECRET    # reachable from other machines

The model is loaded once; avatars uploaded to POST /v1/avatars are prepared once and kept under
--avatars_dir (they survive restarts); WebSocket /v1/stream?avatar_id=ID turns 16 kHz PCM into
lip-synced JPEG frames as the audio arrives, frames of concurrent sessions going through the
generator together. The API and the streaming protocol are in docs/serving.md.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import re
import sys

from lipsync.core.cli import HelpFormatter
from lipsync.core.errors import Wav2LipError
from lipsync.core.settings import add_arguments
from lipsync.render.settings import SETTINGS
from lipsync.serve.sessions import MAX_GROUP

TOKEN_ENV = "WAV2LIP_TOKEN"
# declared in lipsync.render.settings
SHARED_FLAGS = ("device", "precision", "threads", "int8_cache_dir", "face_detector", "s3fd_path")


class ServeError(Wav2LipError, ValueError):
    """A server flag that cannot work; the message says which."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add = p.add_argument
    add_arguments(p, [SETTINGS["checkpoint_path"]])
    add("--host", default="127.0.0.1", help="address to listen on; anything but a loopback address needs --token")
    add("--port", type=int, default=8000, help="TCP port")
    add("--avatars_dir", default="avatars", help="where prepared avatars are kept (one folder per avatar id)")
    add("--token", default=os.environ.get(TOKEN_ENV) or None,
        help=f"require this token on every request (Authorization: Bearer TOKEN, or ?token=TOKEN); default: "
             f"${TOKEN_ENV}, else none")
    add("--max_sessions", type=int, default=8, help="streams plus /v1/lipsync jobs at once; more get 503")
    # the generator's and the detector's flags are inference.py's (for uploaded faces without a box)
    add_arguments(p, [SETTINGS[name] for name in SHARED_FLAGS])
    add("--max_upload_mb", type=float, default=200.0, help="largest request body (uploads), MB; larger get 413")
    add("--upload_timeout", type=float, default=600.0, help="seconds a request body may take to arrive; later: 408")
    add("--max_frame_pixels", type=int, default=3840 * 2160,
        help="largest frame (width x height, pixels) of an uploaded face; larger get 422")
    add("--max_avatar_seconds", type=float, default=300.0,
        help="longest uploaded face video (seconds on its timeline); longer get 422")
    add("--max_audio_seconds", type=float, default=600.0, help="longest /v1/lipsync audio, seconds; longer get 422")
    add("--max_batch", type=int, default=64, help="frames of all sessions per generator call")
    add("--batch_wait_ms", type=float, default=10.0,
        help="how long a generator call waits for other sessions' frames, ms (not at all when no other session "
             "has frames in flight)")
    add("--jpeg_quality", type=int, default=80, help="JPEG quality of streamed frames (1-100)")
    add("--send_buffer", type=int, default=50,
        help=f"frames queued per session for a slow reader (at least {MAX_GROUP}); beyond it the oldest idle, then "
             "the oldest talk frames are dropped")
    add("--idle_grace", type=float, default=0.25,
        help="seconds past the expected next audio message before idle frames start (negative: no idle frames)")
    add("--idle_timeout", type=float, default=300.0,
        help="a stream without audio, or a live session without viewers and speech, for this many seconds is closed")
    add("--max_viewers", type=int, default=4, help="WebRTC viewers per live session (/v1/sessions); more get 503")
    add("--ice_server", action="append", default=[], metavar="URL",
        help="a STUN or TURN server for WebRTC (stun:host:port, turn:host:port); repeat for several; default: none "
             "(host candidates only: viewers on this machine or its network)")
    add("--ice_username", default=None, help="username for the --ice_server turn: URLs")
    add("--ice_credential", default=None, help="credential (password) for the --ice_server turn: URLs")
    add("--webrtc_lead", type=float, default=0.2,
        help="seconds of an utterance rendered before it starts playing to WebRTC viewers")
    add("--connect_timeout", type=float, default=30.0,
        help="seconds a WebRTC viewer may take to connect after its offer was answered; later it is dropped")
    add("--consent_timeout", type=float, default=30.0,
        help="seconds after which a connected WebRTC viewer that stopped answering ICE consent checks (it vanished "
             "without closing) is dropped; 30 is RFC 7675's expiry; shorter frees its slot and encoder sooner, but "
             "drops viewers whose network pauses that long")
    add("--hold_mb", type=float, default=1024.0, help="decoded frames of an avatar kept in memory up to this many "
                                                      "MB (larger avatars are decoded per session)")
    add("--shutdown_timeout", type=float, default=30.0,
        help="on SIGTERM, seconds to let uploads and /v1/lipsync jobs in flight finish before they are cancelled")
    add("--log_level", choices=("debug", "info", "warning", "error"), default="info", help="server log level")
    from lipsync.media.ffmpeg import add_ffmpeg_arg

    add_ffmpeg_arg(p)
    return p


def is_local(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``): reachable from this machine only."""
    if host.strip().lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_args(args) -> None:
    """Flag values that cannot work or are unsafe; raises ServeError naming the flag."""
    if not is_local(args.host) and not args.token:
        raise ServeError(f"--host {args.host} is reachable from other machines: give --token TOKEN (or set "
                         f"${TOKEN_ENV}) so that only clients with the token can use the server")
    if args.token is not None and len(args.token) < 8:
        raise ServeError("--token must be at least 8 characters")
    if not 0 < args.port < 65536:
        raise ServeError(f"--port must be 1-65535, got {args.port}")
    for name in ("max_sessions", "max_batch", "max_viewers"):
        if getattr(args, name) < 1:
            raise ServeError(f"--{name} must be >= 1")
    if args.send_buffer < MAX_GROUP:
        raise ServeError(f"--send_buffer must be at least {MAX_GROUP} frames (one audio message can release that many "
                         "at once; a reader that keeps up must not lose them)")
    if not 1 <= args.jpeg_quality <= 100:
        raise ServeError("--jpeg_quality must be 1-100")
    limits = ("max_upload_mb", "idle_timeout", "upload_timeout", "max_frame_pixels", "max_avatar_seconds",
              "max_audio_seconds", "connect_timeout", "consent_timeout")
    for name in limits:
        if not getattr(args, name) > 0:
            raise ServeError(f"--{name} must be positive")
    for url in args.ice_server:
        if not url.startswith(("stun:", "stuns:", "turn:", "turns:")):
            raise ServeError(f"--ice_server {url!r}: give a stun:, stuns:, turn: or turns: URL")
    if args.ice_server:
        from lipsync.serve.webrtc import WebRTCUnavailable, require_aiortc

        try:
            require_aiortc()
        except WebRTCUnavailable as exc:
            raise ServeError(f"--ice_server is for WebRTC, which needs aiortc: {exc}") from None
    if args.batch_wait_ms < 0 or args.shutdown_timeout < 0 or args.webrtc_lead < 0:
        raise ServeError("--batch_wait_ms, --shutdown_timeout and --webrtc_lead must not be negative")
    if not os.path.isfile(args.checkpoint_path):
        raise ServeError(f"--checkpoint_path not found: {args.checkpoint_path!r}")


def browser_url(host: str, port: int, token: bool) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/" + ("?token=YOUR_TOKEN" if token else "")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from lipsync.core.errors import run_main

    return run_main(_serve, args)


def _serve(args) -> int:
    from lipsync.media.ffmpeg import use_ffmpeg

    check_args(args)
    use_ffmpeg(args.ffmpeg)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(levelname)s: %(message)s")
    import uvicorn

    from lipsync.render.onnx_model import open_generator
    from lipsync.serve.app import create_app
    from lipsync.serve.live import LiveOptions
    from lipsync.serve.state import ServerConfig, ServerState
    from lipsync.serve.stream_output import StreamOptions

    generator = open_generator(args.checkpoint_path, device="cpu" if args.precision == "int8" and args.device == "auto"
                               else args.device, precision=args.precision, threads=args.threads,
                               int8_cache_dir=args.int8_cache_dir)
    if getattr(generator, "awaiting_calibration", False):
        # sessions arrive with faces not known yet: calibrate on the synthetic clip (export_onnx.py --int8
        # with an avatar of the server's own calibrates on real faces)
        from lipsync.render.quantize import quality_line
        from lipsync.train.synthetic import synthetic_calibration

        generator.calibrate(synthetic_calibration(generator.img_size))
        logging.warning("int8 generator calibrated on a synthetic clip (%s); for faces closer to fp32's, serve an "
                        "int8 file: export_onnx.py --int8 --calibration_face AVATAR --calibration_audio SPEECH",
                        quality_line(generator.int8["quality"], of="the clip"))
    options = StreamOptions(jpeg_quality=args.jpeg_quality, idle_grace=args.idle_grace,
                            idle_timeout=args.idle_timeout, send_buffer=args.send_buffer)
    config = ServerConfig(avatars_dir=args.avatars_dir, token=args.token, max_sessions=args.max_sessions,
                          max_upload_mb=args.max_upload_mb, face_detector=args.face_detector,
                          s3fd_path=args.s3fd_path, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                          hold_mb=args.hold_mb, max_frame_pixels=args.max_frame_pixels,
                          max_avatar_seconds=args.max_avatar_seconds, max_audio_seconds=args.max_audio_seconds,
                          upload_timeout=args.upload_timeout, stream=options,
                          live=LiveOptions(max_viewers=args.max_viewers, lead=args.webrtc_lead,
                                           connect_timeout=args.connect_timeout, consent_timeout=args.consent_timeout,
                                           ice_servers=tuple(args.ice_server),
                                           ice_username=args.ice_username, ice_credential=args.ice_credential))
    state = ServerState(generator, config)
    if args.face_detector == "sfd":
        from face_detection import DEFAULT_S3FD_PATH

        weights = args.s3fd_path or DEFAULT_S3FD_PATH
        if not os.path.isfile(weights):
            logging.warning("no S3FD weights at %s: uploads without a 'box' will fail until they are there "
                            "(or restart with --face_detector lbp or dlib_hog)", weights)
    elif args.face_detector.startswith("dlib"):
        from face_detection import get_detector

        get_detector(args.face_detector)  # a missing optional package stops here, naming the pip command
    app = create_app(state)
    # no permessage-deflate: the frames are JPEGs (they do not shrink), and deflating them costs CPU
    # on both ends for every frame of every session
    uv = uvicorn.Config(app, host=args.host.strip("[]"), port=args.port, log_level=args.log_level, ws_max_size=1 << 20,
                        ws_per_message_deflate=False, timeout_graceful_shutdown=int(round(args.shutdown_timeout)),
                        server_header=False)
    logging.getLogger("uvicorn.error").addFilter(_DenialNoise())
    logging.getLogger("uvicorn.access").addFilter(_HideToken())
    server = _Server(uv, state)
    n = len(state.store.ids())
    print(f"wav2lip server: {generator.describe()}; {n} avatar(s) in {state.store.root}", flush=True)
    _say_if_no_webrtc()
    print(f"open {browser_url(args.host, args.port, bool(args.token))} in a browser", flush=True)
    server.run()
    return 0 if server.started else 2


def _say_if_no_webrtc() -> None:
    from lipsync.serve.webrtc import WebRTCUnavailable, require_aiortc

    try:
        require_aiortc()
    except WebRTCUnavailable as exc:
        logging.warning("WebRTC (/v1/sessions) is off: %s", exc)


class _DenialNoise(logging.Filter):
    """uvicorn's websockets-sansio protocol logs "ASGI callable returned without completing
    handshake" after an app refuses a WebSocket with an HTTP response (401, 404, 503: the
    denial-response extension it supports), though the client got that response. Every other way
    out of this app's stream handler accepts first, so here the message only ever means a refusal."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "returned without completing handshake" not in record.getMessage()


class _HideToken(logging.Filter):
    """The access log shows ``?token=`` values as ``***`` (browsers can only pass the token in the URL)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(hide_token(a) if isinstance(a, str) else a for a in record.args)
        return True


def hide_token(text: str) -> str:
    """``text`` (a URL or request line) with the value of every ``token=`` query parameter replaced by ``***``."""
    return re.sub(r"([?&]token=)[^&\s]*", r"\1***", text)


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, which on SIGTERM / Ctrl-C first ends running streams with an error message
        (uvicorn itself would drop them with close code 1012), then shuts down as usual."""

        def __init__(self, config, state):
            super().__init__(config)
            self.state = state

        async def shutdown(self, sockets=None):
            await self.state.end_streams()
            await super().shutdown(sockets)

    return Server


def _Server(config, state):
    return _server_class()(config, state)


if __name__ == "__main__":
    sys.exit(main())
