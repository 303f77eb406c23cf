"""--target_face: the rule, the tracker, and on the real-photograph videos (lipsync.train.face_videos) which
face's pixels a render changes; --mask landmarks: the mask's shape and what a paste through it touches."""
import argparse
import importlib.util
import sys

import numpy as np
import pytest

from face_detection import DetectorError, Face, box_iou
from lipsync.core.settings import SettingError
from lipsync.render.avatar import prepare_avatar
from lipsync.render.avatar_settings import AvatarSettings, settings_from_flags
from lipsync.render.blending import CpuComposer, landmark_mask
from lipsync.render.boxes import DetectionSettings, FaceFinder
from lipsync.render.engine import render_windows
from lipsync.render.tracking import FaceTracker, parse_target_face, pick, target_rule
from lipsync.train.face_videos import FRAME_SIZE, Placement, make_video, render_frame
from lipsync.media.video import VideoWriter

HAVE_DLIB = importlib.util.find_spec("dlib") is not None
HAVE_MODELS = HAVE_DLIB and importlib.util.find_spec("face_recognition_models") is not None
needs_dlib = pytest.mark.skipif(not HAVE_DLIB, reason="dlib not installed (pip install -r requirements-faces.txt)")
needs_models = pytest.mark.skipif(not HAVE_MODELS, reason="dlib or face-recognition-models not installed "
                                  "(pip install -r requirements-faces.txt)")
N = 8  # frames per test video


def face(x, w=100, y=60, score=1.0):
    return Face((x, y, x + w, y + w), score)


def test_rule_text():
    assert target_rule("largest") == ("largest", None) and target_rule(" 2 ") == ("index", 2)
    assert target_rule("120, 80") == ("point", (120, 80))
    assert parse_target_face("LARGEST") == "largest" and parse_target_face("3, 4") == "3,4"
    for bad in ("-1", "1,2,3", "left", "", "1.5"):
        with pytest.raises(SettingError, match="largest, a face number N"):
            target_rule(bad)
        with pytest.raises(argparse.ArgumentTypeError):
            parse_target_face(bad)


def test_pick():
    faces = [face(200, 80), face(10, 60), face(100, 120)]  # best first, as detectors give them
    assert pick(faces, "largest") == 0          # the detector's best, as before the rule existed
    assert [pick(faces, str(n)) for n in range(4)] == [1, 2, 0, None]
    assert pick(faces, "230,100") == 0          # inside the right face's box
    assert pick(faces, "5,5") == 1              # inside none: the nearest box
    assert pick([], "0") is None and pick([face(0, 50)], "largest") == 0


def test_tracker_follows_the_face_not_the_position():
    tracker = FaceTracker("1")
    assert tracker.step([face(200), face(10)]) == face(200).box          # the 2nd from the left
    # the order detectors give them changes; the chosen one is followed
    assert tracker.step([face(30), face(170)]) == face(170).box
    # hidden: nothing for it, and the other face passing over its last place is not taken
    for x in (80, 130, 180, 230):
        assert tracker.step([face(x)]) is None
    # back where it was last seen, while the other face is elsewhere
    assert tracker.step([face(170), face(260)]) == face(170).box
    # a cut: the rule picks again
    assert tracker.step([face(0), face(300)], cut=True) == face(300).box


def test_largest_is_each_frames_best_face():
    # largest gives every frame's best detection, jumps included (the boxes of before the rule)
    tracker = FaceTracker("largest")
    boxes = [face(10), face(300), None, face(20, 50)]
    out = [tracker.step([] if f is None else [f, face(150, 20)]) for f in boxes]
    assert out == [None if f is None else f.box for f in boxes]
    other = FaceTracker("0")
    assert [other.step([] if f is None else [f]) for f in boxes] == [face(10).box, None, None, None]


def test_tracked_largest_stays_on_its_face_and_finds_it_again():
    # outside parity mode largest follows the face it picked, whichever the detector ranks first
    tracker = FaceTracker("largest", track_largest=True)
    frames = [[face(10), face(300)], [face(300), face(14)], [face(305), face(18)], [face(310)],
              [face(312), face(120)], [face(316), face(124)]]
    out = [tracker.step(f) for f in frames]
    # frame 3: its face is missed: that frame's best face, as published (no frame loses its face);
    # frames 4-5: the other face is back in view, the chosen one (moved while unseen) is a new face there
    assert out == [face(10).box, face(14).box, face(18).box, face(310).box, face(312).box, face(316).box]
    assert FaceTracker("largest").step([face(300), face(14)]) == face(300).box   # parity: each frame's best


@needs_dlib
def test_default_largest_keeps_one_of_two_faces():
    """The two-face scene with the flags' defaults: every box on the same face; parity mode keeps the
    published per-frame rule, which jumps between the two here (their scores cross)."""
    video = make_video("two_faces", 12)

    def chosen_faces(flags):
        detection = settings_from_flags({"face_detector": "dlib_hog", "det_every": 1, **flags}).detection
        boxes = FaceFinder(detection, "cpu").run(iter(video.frames))
        assert all(b is not None for b in boxes)
        return {max(range(2), key=lambda k: box_iou(b, truth[k].box)) for b, truth in zip(boxes, video.faces)}

    assert len(chosen_faces({})) == 1
    assert chosen_faces({"blend": "none", "loop": "repeat"}) == {0, 1}


def test_setting_is_declared_once():
    from inference import build_parser

    args = build_parser().parse_args(["--checkpoint_path", "x", "--face", "f.mp4", "--audio", "a.wav",
                                      "--target_face", "1"])
    assert args.target_face == "1" and build_parser().parse_args(
        ["--checkpoint_path", "x", "--audio", "a"]).target_face == "largest"
    settings = settings_from_flags({"target_face": "120,80"})
    assert settings.detection.target == "120,80" and settings.record()["target_face"] == "120,80"
    assert AvatarSettings.from_record(settings.record()).detection.target == "120,80"
    default = settings_from_flags({})
    assert default.record()["target_face"] == "largest"
    # largest keeps the detection cache keys of before; another choice has its own
    assert DetectionSettings().identity() == ["sfd", 1.0, 1, 0.7] + DetectionSettings().weights()
    assert DetectionSettings(target="1").identity() != DetectionSettings().identity()
    from lipsync.serve.uploads import FORM_FIELDS

    hint, ok = FORM_FIELDS["target_face"]
    assert ok("0") and ok("largest") and not ok("left")


# ---- on the real-photograph videos ----------------------------------------------------------------
def chosen_photos(video, dets):
    """Per frame, the photo whose true box the detection overlaps most ('-': none)."""
    out = ""
    for truth, d in zip(video.faces, dets):
        best = None if d is None else max(truth, key=lambda t: box_iou(t.box, d))
        out += "-" if best is None or box_iou(best.box, d) < 0.3 else best.photo[0]
    return out


@needs_dlib
@pytest.mark.parametrize("every", [1, 3])
def test_finder_follows_the_chosen_face(every):
    def run(scene, target, frames=None):
        video = make_video(scene, N) if frames is None else frames
        finder = FaceFinder(DetectionSettings(detector="dlib_hog", target=target, every=every, batch_size=4), "cpu")
        return chosen_photos(video, finder.run(video.frames))

    w, h = FRAME_SIZE
    assert run("two_faces", "0") == "a" * N and run("two_faces", "1") == "g" * N
    assert run("two_faces", f"{int(0.73 * w)},{h // 2}") == "g" * N
    # crossing: grace_hopper (right at first) is hidden by the astronaut passing in front; while it is
    # hidden its frames pass through, and the astronaut is never taken in its place
    crossing = run("crossing", "1")
    assert crossing[0] == "g" and set(crossing) <= {"g", "-"} and "-" in crossing
    assert run("crossing", "0") == "a" * N
    # a cut: the rule picks again (the astronaut, then grace_hopper: the leftmost each time)
    assert run("cut", "0") == "a" * (N // 2) + "g" * (N // 2)


@needs_dlib
def test_after_a_cut_the_rule_picks_again():
    # the leftmost face, then a cut to a shot where only the other face is, where it was: without the
    # cut it would be another face than the chosen one (passed through); after a cut the rule picks it
    w, h = FRAME_SIZE
    two = [Placement("astronaut", (w * 0.27, h * 0.5), h * 0.47), Placement("grace_hopper", (w * 0.73, h * 0.52), h * 0.47)]
    frames = [render_frame(two if k < 3 else two[1:], seed=3)[0] for k in range(6)]
    finder = FaceFinder(DetectionSettings(detector="dlib_hog", target="0"), "cpu")
    dets = finder.run(frames)
    assert all(d is not None for d in dets)
    assert dets[0][2] < w / 2 < dets[-1][0]


def write_video(path, frames, fps=25):
    h, w = frames[0].shape[:2]
    with VideoWriter(str(path), w, h, fps) as writer:
        for f in frames:
            writer.write(f)
    return str(path)


def rendered(tmp_path, frames, target, mask="ellipse"):
    """(source frames, output frames) of a render whose generator returns white faces."""
    path = write_video(tmp_path / f"faces_{target.replace(',', '_')}.mp4", frames)
    settings = settings_from_flags({"face_detector": "dlib_hog", "target_face": target, "det_every": 1})
    avatar = prepare_avatar(path, settings, 96, cache=None, progress=False)
    source = [f.copy() for _, f in avatar.output_frames(len(frames), "repeat")]
    white = lambda mels, faces, keys: np.full(faces.shape, 255, np.uint8)  # noqa: E731
    out = list(render_windows(white, avatar, [np.zeros((len(frames), 80, 16), np.float32)], n_out=len(frames),
                              blend="feather", composer=CpuComposer(96, "feather", mask)))
    return source, out


def changed(a, b, box):
    x1, y1, x2, y2 = box
    return np.abs(a[y1:y2, x1:x2].astype(int) - b[y1:y2, x1:x2]).max()


@needs_dlib
@pytest.mark.parametrize("target,which", [("0", 0), ("1", 1), ("230,120", 1), ("80,100", 0)])
def test_only_the_chosen_faces_pixels_change(tmp_path, target, which):
    video = make_video("two_faces", 4)
    source, out = rendered(tmp_path, video.frames, target)
    for truth, before, after in zip(video.faces, source, out):
        chosen, other = truth[which], truth[1 - which]
        assert changed(before, after, chosen.box) > 50
        assert changed(before, after, other.box) == 0  # the other face: untouched, bit for bit


@needs_models
def test_landmark_mask_follows_the_jaw(tmp_path):
    from face_detection import get_detector

    video = make_video("two_faces", 2)
    det = get_detector("dlib_hog", landmarks=True)
    found = det.detect_all(video.frames[:1])[0][0]
    x1, y1, x2, y2 = found.box
    coords = (y1, y2 + 10, x1, x2)
    mask = landmark_mask(found.landmarks, coords)
    assert mask.shape == (y2 + 10 - y1, x2 - x1) and mask.dtype == np.float32
    assert mask.max() == 1.0 and mask[0].max() == mask[-1].max() == mask[:, 0].max() == mask[:, -1].max() == 0
    top = found.landmarks[[2, 14, 31, 32, 33, 34, 35], 1].min() - y1
    assert mask[: int(top) - 1].max() == 0     # nothing above the nose's bottom and the jaw's ends
    mouth = np.round(found.landmarks[48:68].mean(axis=0) - (x1, y1)).astype(int)
    assert mask[mouth[1], mouth[0]] == 1.0
    assert landmark_mask(np.zeros((68, 2), np.float32), coords) is None  # a degenerate polygon: the ellipse
    # a render through it changes the chosen face below the nose only, and never the other face
    source, out = rendered(tmp_path, video.frames, "0", mask="landmarks")
    for truth, before, after in zip(video.faces, source, out):
        assert changed(before, after, truth[0].box) > 50 and changed(before, after, truth[1].box) == 0


def test_landmark_mask_without_dlib_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)
    with pytest.raises(DetectorError, match="pip install -r requirements-faces.txt"):
        CpuComposer(96, "feather", "landmarks")
    from lipsync.render.inference import InferenceConfig, validate

    cfg = InferenceConfig(checkpoint_path=__file__, audio="a.wav", face="f.mp4", mask="landmarks")
    with pytest.raises(DetectorError, match="pip install -r requirements-faces.txt"):
        validate(cfg)


def test_mask_auto_is_landmarks_only_where_they_are_installed(monkeypatch):
    from face_detection import dlib_faces
    from lipsync.render.blending import resolve_mask

    assert resolve_mask("ellipse", "feather") == "ellipse" and resolve_mask("auto", "none") == "none"
    assert resolve_mask("auto", "feather") == ("landmarks" if dlib_faces.landmarks_available() else "ellipse")
    assert (CpuComposer(96, "feather", "auto").landmarker is not None) == dlib_faces.landmarks_available()
    monkeypatch.setitem(sys.modules, "dlib", None)  # without dlib: the ellipse, and no error
    assert not dlib_faces.landmarks_available()
    assert resolve_mask("auto", "feather") == "ellipse"
    assert CpuComposer(96, "feather", "auto").landmarker is None


@needs_models
def test_inference_summary_names_the_detector_and_the_mask(tmp_path):
    from lipsync.render.inference import InferenceConfig, run_inference
    from tests.media import tone_wav
    from tests.serving import tiny_checkpoint

    path = write_video(tmp_path / "faces.mp4", make_video("two_faces", 6).frames)
    wav = tone_wav(tmp_path / "a.wav", 0.3)
    cfg = InferenceConfig(checkpoint_path=tiny_checkpoint(tmp_path / "g.pth"), face=path, audio=str(wav),
                          outfile=str(tmp_path / "o.mp4"), face_detector="dlib_hog", target_face="1",
                          det_cache_dir="", progress=False)
    summary = run_inference(cfg)
    assert summary.mask == "landmarks" and summary.detector == "dlib_hog face detector"
    assert "(dlib_hog face detector, mask landmarks)" in summary.line()


@needs_dlib
def test_a_face_number_beyond_the_faces_found_says_so(tmp_path):
    from lipsync.render.avatar import AvatarError

    path = write_video(tmp_path / "two.mp4", make_video("two_faces", 2).frames)
    settings = settings_from_flags({"face_detector": "dlib_hog", "target_face": "5", "det_every": 1})
    with pytest.raises(AvatarError, match="no frame of .* has a face number 5"):
        prepare_avatar(path, settings, 96, cache=None, progress=False)
