"""The detector contract, S3FD plumbing on generated weights, and LBP on real photographs."""
import cv2
import numpy as np
import pytest
import torch

from face_detection import DEFAULT_S3FD_PATH, S3FD_URL, DetectorError, get_detector
from face_detection import box_iou as iou
from face_detection.sfd import BGR_MEAN, boxes_from_outputs
from fill_rule import fill_state_dict

# faces located by eye (forehead to chin, cheek to cheek), in pixels
ASTRONAUT_FACE = (172, 70, 272, 182)
GRACE_HOPPER_FACE = (160, 135, 372, 340)


def astronaut_bgr():
    from skimage import data

    return cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)


def grace_hopper_bgr():
    import matplotlib.cbook as cbook

    return cv2.imread(str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))


@pytest.fixture(scope="module")
def s3fd_weights(tmp_path_factory):
    from face_alignment.detection.sfd.net_s3fd import s3fd

    path = str(tmp_path_factory.mktemp("sfd") / "s3fd.pth")
    torch.save(fill_state_dict(s3fd().state_dict(), seed=0), path)
    return path


def test_missing_s3fd_weights_error_names_path_url_and_alternative(tmp_path):
    missing = str(tmp_path / "s3fd.pth")
    with pytest.raises(DetectorError) as err:
        get_detector("sfd", weights_path=missing)
    msg = str(err.value)
    assert missing in msg and S3FD_URL in msg and "--face_detector lbp" in msg
    assert DEFAULT_S3FD_PATH.endswith("face_detection/detection/sfd/s3fd.pth")


def test_wrong_file_as_s3fd_weights(tmp_path):
    from models import Wav2Lip

    path = str(tmp_path / "wav2lip.pth")
    torch.save({"state_dict": Wav2Lip(width=0.125).state_dict()}, path)
    with pytest.raises(DetectorError, match="not an S3FD checkpoint"):
        get_detector("sfd", weights_path=path)


def test_unknown_backend():
    with pytest.raises(DetectorError, match="unknown face detector"):
        get_detector("dlib")


def test_sfd_runs_on_generated_weights(s3fd_weights):
    det = get_detector("sfd", device="cpu", weights_path=s3fd_weights)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (96, 128, 3), dtype=np.uint8) for _ in range(3)]
    frames.append(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))  # mixed sizes in one batch
    boxes = det.detect(frames)
    assert len(boxes) == 4
    for box, frame in zip(boxes, frames):
        if box is not None:
            x1, y1, x2, y2 = box
            assert all(isinstance(v, int) for v in box)
            assert 0 <= x1 < x2 <= frame.shape[1] and 0 <= y1 < y2 <= frame.shape[0]


def _head_outputs(batch, size, hits):
    """Raw S3FD outputs for an image of ``size``; ``hits`` = [(batch, level, h, w, logit, reg)]."""
    olist = []
    for level in range(6):
        stride = 2 ** (level + 2)
        n = size // stride
        cls = torch.zeros(batch, 2, n, n)
        cls[:, 0] = 5.0  # background everywhere
        olist += [cls, torch.zeros(batch, 4, n, n)]
    for b, level, h, w, logit, reg in hits:
        olist[2 * level][b, 1, h, w] = logit
        olist[2 * level + 1][b, :, h, w] = torch.tensor(reg, dtype=torch.float32)
    return olist


def test_sfd_box_post_processing():
    # image 0: a strong anchor at stride 8 (h=3, w=5) with no regression -> the anchor box itself,
    # plus an overlapping weaker neighbour that NMS must drop; image 1: only a weak candidate
    olist = _head_outputs(2, 128, [(0, 1, 3, 5, 12.0, (0, 0, 0, 0)), (0, 1, 3, 6, 8.0, (0, 0, 0, 0)),
                                   (1, 2, 2, 2, 5.5, (0, 0, 0, 0))])
    det0, det1 = boxes_from_outputs(olist, 2)
    cx, cy, side = 8 / 2 + 5 * 8, 8 / 2 + 3 * 8, 8 * 4
    np.testing.assert_allclose(det0[:4], [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], atol=1e-4)
    assert det0[4] > 0.99
    assert det1 is not None and det1[4] > 0.5  # softmax(5.5 vs 5.0) ~ 0.62 passes the 0.5 filter

    olist = _head_outputs(1, 128, [(0, 0, 1, 1, 4.0, (0, 0, 0, 0))])  # score ~0.27: filtered out
    assert boxes_from_outputs(olist, 1) == [None]

    # a regression shifts the centre by loc * 0.1 * prior size and scales by exp(loc * 0.2)
    olist = _head_outputs(1, 128, [(0, 2, 4, 4, 12.0, (1.0, 0.0, np.log(2) / 0.2, 0.0))])
    (det,) = boxes_from_outputs(olist, 1)
    cx, cy, side = 16 / 2 + 4 * 16 + 0.1 * 64, 16 / 2 + 4 * 16, 64
    np.testing.assert_allclose(det[:4], [cx - side, cy - side / 2, cx + side, cy + side / 2], atol=1e-3)


def test_sfd_feeds_bgr_minus_mean_and_clips_boxes(s3fd_weights):
    det = get_detector("sfd", weights_path=s3fd_weights)
    seen = {}

    def fake_net(x):
        seen["x"] = x.clone()
        # a box hanging off the top-left corner must come back clipped to the image
        return _head_outputs(1, 128, [(0, 3, 0, 0, 12.0, (0, 0, 0, 0))])

    det.net = fake_net
    frame = np.zeros((128, 128, 3), np.uint8)
    frame[..., 0], frame[..., 1], frame[..., 2] = 10, 20, 30  # B, G, R
    (box,) = det.detect([frame])
    np.testing.assert_allclose(seen["x"][0, :, 0, 0].numpy(), np.array([10, 20, 30]) - np.array(BGR_MEAN))
    # stride 32 anchor at (16, 16), side 128 -> (-48, -48, 80, 80) clipped
    assert box == (0, 0, 80, 80)


@pytest.mark.parametrize("photo,truth", [(astronaut_bgr, ASTRONAUT_FACE), (grace_hopper_bgr, GRACE_HOPPER_FACE)])
def test_lbp_finds_faces_in_real_photographs(photo, truth):
    det = get_detector("lbp")
    (box,) = det.detect([photo()])
    assert box is not None
    assert iou(box, truth) >= 0.5


def test_lbp_returns_none_without_a_face():
    det = get_detector("lbp")
    flat = np.full((240, 320, 3), 127, np.uint8)
    noise = np.random.default_rng(1).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    assert det.detect([flat, noise]) == [None, None]


def test_bad_frames_are_rejected():
    det = get_detector("lbp")
    with pytest.raises(DetectorError, match="expected a BGR image"):
        det.detect([np.zeros((10, 10), np.uint8)])
    assert det.detect([]) == []


def test_sfd_detect_all_returns_every_face_best_first(s3fd_weights):
    det = get_detector("sfd", weights_path=s3fd_weights)
    # two separate anchors (stride 16) with different scores, one weak one filtered out
    det.net = lambda x: _head_outputs(1, 128, [(0, 2, 1, 1, 8.0, (0, 0, 0, 0)), (0, 2, 5, 5, 12.0, (0, 0, 0, 0)),
                                               (0, 2, 3, 6, 4.0, (0, 0, 0, 0))])
    (faces,) = det.detect_all([np.zeros((128, 128, 3), np.uint8)])
    assert [f.box for f in faces] == [(56, 56, 120, 120), (0, 0, 56, 56)]  # anchor side 64 at (88, 88) and (24, 24)
    assert faces[0].score > faces[1].score > 0.5 and faces[0].landmarks is None
    assert det.detect([np.zeros((128, 128, 3), np.uint8)]) == [faces[0].box]
