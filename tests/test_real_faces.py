"""Detection on videos made from real photographs (lipsync.train.face_videos): recall and box IoU per
backend, every face of a frame with detect_all, dlib's landmarks, and the errors of a missing optional
package. The dlib backends are skipped, with the reason, only where their packages are absent."""
import importlib.util
import sys

import numpy as np
import pytest

from face_detection import DetectorError, box_iou, get_detector, get_landmarker
from lipsync.train.face_videos import (FRAME_SIZE, SCENES, Placement, make_video, render_frame,
                                       scene_placements, score_detections)
from lipsync.train.synthetic_faces import PHOTOS, load_photo

N_FRAMES = 6
CNN_FRAMES = 3  # the MMOD CNN runs at about 2 frames/s on 2 cores: fewer frames keep its tests to seconds
HAVE_DLIB = importlib.util.find_spec("dlib") is not None
HAVE_MODELS = importlib.util.find_spec("face_recognition_models") is not None
needs_dlib = pytest.mark.skipif(not HAVE_DLIB, reason="dlib not installed (pip install -r requirements-faces.txt)")
needs_models = pytest.mark.skipif(not (HAVE_DLIB and HAVE_MODELS), reason="dlib or face-recognition-models not "
                                  "installed (pip install -r requirements-faces.txt)")
# (backend, its marks, least recall, least mean IoU): measured on these videos, docs/faces.md; lbp is
# frontal-only and the weakest
BACKENDS = [("lbp", (), 0.75, 0.70), ("dlib_hog", (needs_dlib,), 0.95, 0.72),
            ("dlib_cnn", (needs_models,), 0.80, 0.72)]
PARAMS = [pytest.param(name, recall, iou, marks=marks, id=name) for name, marks, recall, iou in BACKENDS]


@pytest.fixture(scope="module")
def videos():
    return {name: make_video(name, N_FRAMES) for name in SCENES}


@pytest.fixture(scope="module")
def short_videos():
    return {name: make_video(name, CNN_FRAMES) for name in SCENES}


@pytest.fixture(scope="module")
def detectors():
    return {}


def detector(cache, name):
    if name not in cache:
        cache[name] = get_detector(name)
    return cache[name]


def test_true_boxes_follow_the_photographs_boxes():
    # an upright face at the frame's centre: its box is the photograph's box by eye, scaled
    x1, y1, x2, y2 = PHOTOS["astronaut"]["face"]
    frame, (face,) = render_frame([Placement("astronaut", (160, 120), 112)])
    assert frame.shape == (FRAME_SIZE[1], FRAME_SIZE[0], 3) and frame.dtype == np.uint8
    assert face.visible > 0.98
    np.testing.assert_allclose(face.box, (160 - (x2 - x1) / 2, 64, 160 + (x2 - x1) / 2, 176), atol=1.5)
    # rolled 25 degrees: the upright box around the rotated ellipse of half-axes a, b
    _, (rolled,) = render_frame([Placement("astronaut", (160, 120), 112, roll=25)])
    a, b, r = (x2 - x1) / 2, 56, np.radians(25)
    half_w, half_h = np.hypot(a * np.cos(r), b * np.sin(r)), np.hypot(a * np.sin(r), b * np.cos(r))
    np.testing.assert_allclose(rolled.box, (160 - half_w, 120 - half_h, 160 + half_w, 120 + half_h), atol=1.5)


def test_scenes_have_what_they_say():
    n = 9
    counts = {s: [len(f) for f in scene_placements(s, n)] for s in SCENES}
    assert counts["two_faces"] == [2] * n and counts["crossing"] == [2] * n
    cut = [p[0].photo for p in scene_placements("cut", n)]
    assert cut[0] == "astronaut" and cut[-1] == "grace_hopper" and len(set(cut)) == 2
    rolls = [p[0].roll for p in scene_placements("rotations", n)]
    yaws = [p[0].yaw for p in scene_placements("rotations", n)]
    assert min(rolls) == -25 and max(rolls) == 25 and min(yaws) == -30 and max(yaws) == 30
    crossing = make_video("crossing", n)
    hidden = [f[0].visible for f in crossing.faces]  # grace_hopper, drawn first, is passed in front of
    assert hidden[0] > 0.6 and min(hidden) < 0.3
    with pytest.raises(ValueError, match="unknown scene"):
        scene_placements("dancing", 2)


def test_scoring_can_fail(videos):
    video = videos["two_faces"]
    truth = [[f.box for f in faces] for faces in video.faces]
    assert score_detections(video, truth) == {"faces": 2 * N_FRAMES, "hits": 2 * N_FRAMES, "recall": 1.0,
                                               "mean_iou": 1.0, "false_positives": 0}
    shifted = [[(x1 + 400, y1, x2 + 400, y2) for x1, y1, x2, y2 in boxes] for boxes in truth]
    score = score_detections(video, shifted)
    assert score["recall"] == 0.0 and score["false_positives"] == 2 * N_FRAMES
    one = [boxes[:1] for boxes in truth]
    assert score_detections(video, one)["recall"] == 0.5
    with pytest.raises(ValueError):
        score_detections(video, truth[:-1])


@pytest.mark.parametrize("name,least_recall,least_iou", PARAMS)
def test_recall_and_box_iou_on_real_photographs(videos, short_videos, detectors, name, least_recall, least_iou):
    det = detector(detectors, name)
    hits = faces = 0
    ious = []
    for video in (short_videos if name == "dlib_cnn" else videos).values():
        found = det.detect_all(video.frames)
        s = score_detections(video, [[f.box for f in frame] for frame in found])
        hits, faces = hits + s["hits"], faces + s["faces"]
        ious += [s["mean_iou"]] * s["hits"]
        assert s["false_positives"] <= (N_FRAMES if name == "lbp" else 0), (video.name, s)
    assert hits / faces >= least_recall, (hits, faces)
    assert np.mean(ious) >= least_iou


@pytest.mark.parametrize("name,least_recall,least_iou", PARAMS)
def test_detect_all_finds_both_faces(videos, short_videos, detectors, name, least_recall, least_iou):
    det = detector(detectors, name)
    video = (short_videos if name == "dlib_cnn" else videos)["two_faces"]
    found = det.detect_all(video.frames)
    single = det.detect(video.frames)
    for truth, faces, best in zip(video.faces, found, single):
        boxes = [f.box for f in faces]
        for t in truth:  # each true face has its own detection
            assert max(box_iou(t.box, b) for b in boxes) >= 0.5, (t, boxes)
        assert all(isinstance(v, int) for f in faces for v in f.box)
        assert best == boxes[0]  # detect keeps one box per frame, the first of detect_all's
    scores = [f.score for f in found[0]]
    assert scores == sorted(scores, reverse=True)


@needs_models
@pytest.mark.parametrize("photo", sorted(PHOTOS))
def test_landmarks_on_real_photographs(photo):
    image = load_photo(photo)
    det = get_detector("dlib_hog", landmarks=True)
    (face,) = det.detect_all([image])[0]
    points = face.landmarks
    assert points.shape == (68, 2) and points.dtype == np.float32
    mouth = points[48:68].mean(axis=0)  # iBUG 300-W: 48-67 outline the mouth, 8 is the chin
    np.testing.assert_allclose(mouth, PHOTOS[photo]["mouth"], atol=0.06 * (face.box[3] - face.box[1]))
    assert points[48:68, 1].max() < points[8, 1] < face.box[3] + 0.1 * (face.box[3] - face.box[1])
    # the same points from any backend's box in the same convention, e.g. the box by eye
    again = get_landmarker()(image, PHOTOS[photo]["face"])
    assert np.abs(again[48:68].mean(axis=0) - mouth).max() < 0.05 * (face.box[3] - face.box[1])


def test_missing_dlib_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)  # import dlib -> ImportError
    for make in (lambda: get_detector("dlib_hog"), lambda: get_detector("dlib_cnn"), get_landmarker):
        with pytest.raises(DetectorError, match="pip install -r requirements-faces.txt"):
            make()


@needs_dlib
def test_missing_model_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "face_recognition_models" else real(name, *a))
    with pytest.raises(DetectorError, match="mmod_human_face_detector.dat.*pip install dlib-bin face-recognition"):
        get_detector("dlib_cnn")
    with pytest.raises(DetectorError, match="shape_predictor_68_face_landmarks.dat"):
        get_landmarker()
    assert get_detector("dlib_hog").name == "dlib_hog"  # built into dlib: needs no model file
