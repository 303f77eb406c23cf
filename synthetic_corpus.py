"""Write a synthetic LRS2-shaped talking-face corpus with known mouth motion.

    python synthetic_corpus.py --out data/synthetic --clips 24 --seed 0
    python synthetic_corpus.py --render_truth data/synthetic/<group>/00001.json --audio speech.wav \
        --outfile truth.mp4        # the true video of that clip's identity saying any audio

Layout: DIR/<group>/<clip>.mp4 (25 fps, 16 kHz AAC) with DIR/<group>/<clip>.json beside it (per-frame
mouth opening and width, face boxes, the identity). See lipsync/train/synthetic.py for how the mouth follows
the audio.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile


def build_parser():
    from lipsync.core.cli import HelpFormatter, QUIET_HELP
    from lipsync.train.synthetic import SPEECH_CHOICES, SPEECH_HELP

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", help="corpus root to write")
    p.add_argument("--clips", type=int, default=24, help="number of clips")
    p.add_argument("--seed", type=int, default=0, help="seed of identities, speech and motion (same seed, same corpus)")
    p.add_argument("--seconds", type=float, default=3.0, help="length of each clip, seconds")
    p.add_argument("--clips_per_group", type=int, default=4, help="clips per group; each group is one identity")
    p.add_argument("--speech", choices=SPEECH_CHOICES, default="auto", help="speech of the clips: " + SPEECH_HELP)
    p.add_argument("--render_truth", metavar="CLIP_JSON", help="render the true video of this clip's identity")
    p.add_argument("--audio", help="with --render_truth: the speech to render")
    p.add_argument("--outfile", help="with --render_truth: the video to write")
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    return p


def render_truth(args) -> int:
    import json

    import audio
    from lipsync.train.synthetic import write_clip
    from lipsync.train.synthetic_faces import Identity

    with open(args.render_truth) as fh:
        ident = Identity.from_dict(json.load(fh)["identity"])
    wav = audio.load_wav(args.audio, audio.SAMPLE_RATE)
    write_clip(args.outfile, ident, wav)
    print(f"wrote {args.outfile}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.render_truth:
        if not (args.audio and args.outfile):
            parser.error("--render_truth needs --audio and --outfile")
        from lipsync.core.errors import run_main

        return run_main(render_truth, args)
    if not args.out:
        parser.error("--out is required")
    if args.clips < 1:
        parser.error("--clips must be >= 1")
    from lipsync.core.errors import run_main

    return run_main(write_corpus, args)


def write_corpus(args) -> int:
    import json

    import numpy as np
    from lipsync.core.progress import progress_bar

    from lipsync.train.synthetic import SpeechError, corpus_plan, make_speech, speech_source, write_clip

    source = speech_source(args.speech)
    plan = corpus_plan(args.clips, args.seed, args.clips_per_group, args.seconds)
    written = skipped = 0
    with tempfile.TemporaryDirectory() as tmp:
        for item in progress_bar(plan, desc="synthetic clips", unit="clip", disable=args.quiet):
            path = os.path.join(args.out, item["group"], item["clip"] + ".mp4")
            truth = os.path.splitext(path)[0] + ".json"
            if os.path.exists(path) and os.path.exists(truth):
                # a clip kept from an earlier run must have this run's speech: a corpus of mixed
                # sources (and a demo trained on it) would say nothing about either
                with open(truth) as fh:
                    made_with = json.load(fh).get("speech")
                if made_with != source:
                    flag = {"espeak-ng": "espeak", "synthesiser": "synth"}.get(made_with, "?")
                    raise SpeechError(f"{truth} was made with {made_with} speech, this run makes {source} speech: "
                                      f"write to another --out, or run with --speech {flag}")
                skipped += 1
                continue
            os.makedirs(os.path.dirname(path), exist_ok=True)
            wav, _ = make_speech(np.random.default_rng(item["audio_seed"]), item["seconds"], tmp, source == "espeak-ng")
            write_clip(path, item["identity"], wav, extra={"speech": source, "audio_seed": item["audio_seed"]})
            written += 1
    groups = len({p["group"] for p in plan})
    print(f"{args.out}: {written} clips written, {skipped} already there, {groups} groups, {source} speech")
    return 0


if __name__ == "__main__":
    sys.exit(main())
