"""Stream a speech file to a running serve.py at real-time pace and save the lip-synced frames it
sends back, with the speech, as an mp4.

    python stream_client.py speech.wav --avatar_id 3f2a9c0d4b5e6f70
    python stream_client.py speech.mp3 --avatar_id ID --url http://gpu-box:8000 --token SECRET --chunk_ms 20

Frames dropped by the server for a slow reader are filled with the previous frame, so the video
keeps its timing; idle frames (sent while no audio arrives) are not part of the video.
"""
from __future__ import annotations

import argparse
import os
import sys

from lipsync.core.cli import QUIET_HELP, HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add = p.add_argument
    add("audio", help="speech: any audio file ffmpeg reads (resampled to 16 kHz mono)")
    add("--avatar_id", required=True, help="a prepared avatar's id (POST /v1/avatars, GET /v1/avatars)")
    add("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    add("--token", default=os.environ.get("WAV2LIP_TOKEN"), help="the server's token (default: $WAV2LIP_TOKEN)")
    add("--chunk_ms", type=float, default=100.0, help="milliseconds of audio per message (10-500)")
    add("--speed", type=float, default=1.0, help="1 = real-time pace, 2 = twice as fast, 0 = as fast as possible")
    add("--outfile", default="results/stream.mp4", help="where to write the received frames + the audio")
    add("--quiet", action="store_true", help=QUIET_HELP)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not 10 <= args.chunk_ms <= 1000:
        build_parser().error("--chunk_ms must be 10-1000 (the server takes at most 1 s per message)")
    if args.speed < 0:
        build_parser().error("--speed must be >= 0")
    from lipsync.core.errors import run_main

    return run_main(_run, args)


def _run(args) -> int:
    import numpy as np

    import audio
    from lipsync.serve.client import ClientError, decode_jpeg, get_json, pcm16, stream_audio
    from lipsync.media.video import VideoWriter

    info = get_json(args.url, f"/v1/avatars/{args.avatar_id}", args.token)
    wav = audio.load_wav(args.audio, audio.SAMPLE_RATE)
    if not args.quiet:
        print(f"streaming {len(wav) / audio.SAMPLE_RATE:.2f} s of speech to {args.url} (avatar {args.avatar_id}, "
              f"{info['width']}x{info['height']} at {info['fps']:g} fps)", flush=True)
    result = stream_audio(args.url, args.avatar_id, pcm16(wav), chunk_ms=args.chunk_ms, speed=args.speed,
                          token=args.token)
    if result.error is not None:
        raise ClientError(f"the server ended the stream: {result.error}")
    if result.end is None:
        raise ClientError("the connection closed before the end of the stream")
    n = int(result.end["frames"])
    last = None
    filled = 0
    with VideoWriter(args.outfile, int(info["width"]), int(info["height"]), float(info["fps"]),
                     audio_path=args.audio) as writer:
        for i in range(n):
            data = result.frames.get(i)
            if data is None:
                filled += 1
            else:
                last = decode_jpeg(data)
            if last is None:   # the first frames were dropped: black until one arrives
                last = np.zeros((int(info["height"]), int(info["width"]), 3), np.uint8)
            writer.write(last)
    lat = result.latencies(float(info["fps"])) * 1000
    lat_text = f", latency p50 {np.percentile(lat, 50):.0f} ms / p95 {np.percentile(lat, 95):.0f} ms" if lat.size else ""
    print(f"wrote {args.outfile}: {n} frames ({len(result.frames)} received, {filled} dropped by the server and "
          f"filled), {result.idle} idle frames skipped{lat_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
