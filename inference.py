"""Lip-sync a face video or photo to any speech with a Wav2Lip checkpoint.

    python inference.py --checkpoint_path checkpoints/wav2lip_gan.pth --face video.mp4 --audio speech.wav
    python inference.py --checkpoint_path G.pth --face video.mp4 --save_avatar avatars/anna   # prepare once
    python inference.py --checkpoint_path G.pth --avatar avatars/anna --audio a.wav b.mp3 --outdir results/

The published flags keep their meaning and defaults. With --preset published (parity mode; the same
as --blend none --loop repeat) the frames are the published script's: every frame detected at full
size, fp32, hard paste. Every flag is declared once, in lipsync/render/settings.py.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from lipsync.core.cli import HelpFormatter
from lipsync.core.settings import add_arguments
from lipsync.render.settings import AVATAR, INFERENCE, check_preset


def build_parser() -> argparse.ArgumentParser:
    """The flags of :data:`lipsync.render.settings.INFERENCE`, in order, and ``--ffmpeg``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_arguments(p, INFERENCE)
    from lipsync.media.ffmpeg import add_ffmpeg_arg

    add_ffmpeg_arg(p)
    return p


def explicit_flags(argv) -> dict:
    """The flags given on the command line (not defaults), by destination."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return vars(p.parse_known_args(argv)[0])


def avatar_wanted(given: dict) -> dict:
    """Avatar settings the user set explicitly, as avatar.json records them."""
    return {s.name: given[s.name] for s in AVATAR if s.name in given}


def output_names(audios, outdir):
    """``outdir/<audio stem>.mp4`` per audio; stems seen twice keep their extension (``a_mp3.mp4``)."""
    stems = [os.path.splitext(os.path.basename(a))[0] for a in audios]
    names = []
    for a, stem in zip(audios, stems):
        name = stem if stems.count(stem) == 1 else stem + "_" + os.path.splitext(a)[1].lstrip(".")
        while name + ".mp4" in names:
            name += "_"
        names.append(name + ".mp4")
    return [os.path.join(outdir, n) for n in names]


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if args.face and args.avatar:
        parser.error("give --face or --avatar, not both")
    if not args.face and not args.avatar:
        parser.error("the face is missing: give --face FILE (or a saved --avatar DIR)")
    if not args.audio and not args.save_avatar:
        parser.error("give --audio (or --save_avatar DIR to only prepare the face)")
    if args.avatar and args.save_avatar:
        parser.error("--save_avatar prepares from --face; it cannot be combined with --avatar")
    audios = args.audio or []
    if len(audios) > 1 and not args.outdir:
        parser.error("several --audio files need --outdir (each output is named after its audio)")
    given = explicit_flags(argv if argv is not None else sys.argv[1:])
    if args.outdir and "outfile" in given:
        parser.error("give --outfile (one output) or --outdir (outputs named after their audio), not both")

    from lipsync.core.errors import run_main

    return run_main(_run, args, audios, given)


def config_of(args, given: dict):
    """The InferenceConfig of parsed ``args`` (``given``: the flags set explicitly, see
    :func:`explicit_flags`); its ``audio`` is the first of ``--audio``. Raises SettingError for a flag
    given with another value than its ``--preset`` sets."""
    from lipsync.render.inference import InferenceConfig

    check_preset(args.preset, given)
    return InferenceConfig(checkpoint_path=args.checkpoint_path, audio=args.audio[0] if args.audio else "",
                           avatar_settings_given=avatar_wanted(given), progress=not args.quiet, **{s.name: getattr(args, s.name) for s in INFERENCE if s.field})


def _run(args, audios, given) -> int:
    from lipsync.render.inference import run_many
    from lipsync.media.ffmpeg import use_ffmpeg

    use_ffmpeg(args.ffmpeg)
    cfg = config_of(args, given)
    outs = output_names(audios, args.outdir) if args.outdir else [args.outfile] * len(audios)
    results = run_many(cfg, list(zip(audios, outs)), keep_going=len(audios) > 1)
    if not audios:
        print(f"saved avatar to {os.path.abspath(args.save_avatar)}")
    failed = 0
    for path, result in zip(audios, results):
        if isinstance(result, Exception):
            from lipsync.core.errors import error_line

            print(f"{error_line(result)} (audio {path!r}: no output written)", file=sys.stderr)
            failed += 1
        else:
            print(result.line())
    if failed:
        print(f"{failed} of {len(audios)} audio file(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
