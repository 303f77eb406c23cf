"""What decides an avatar's frames and boxes (:class:`AvatarSettings`), built from inference flag
values or from what avatar.json records. Which flags those are, and their defaults, is
:data:`lipsync.render.settings.AVATAR`: each names its place here (``"detection.scale"``) and
avatar.json records it under the flag's name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Tuple

from lipsync.media.frames import FrameTransform
from lipsync.render.boxes import DetectionSettings
from lipsync.render.settings import AVATAR, DEFAULT_DET_EVERY, DEFAULTS, NO_BOX, is_published, with_preset


@dataclass(frozen=True)
class AvatarSettings:
    """Everything that decides an avatar's frames and boxes, with the flags' defaults (detection: the
    published one, every frame at full size).

    ``fps``: frames/s of a photo; ``static``: use only the first frame; ``pads``: (top, bottom, left,
    right) pixels added to each detected box; ``nosmooth``: no 5-frame box smoothing; ``box``: a fixed
    (top, bottom, left, right) box for every frame ((-1, -1, -1, -1): detect).
    """

    fps: float = DEFAULTS["fps"]
    static: bool = DEFAULTS["static"]
    transform: FrameTransform = FrameTransform()  # the identity: the flags' defaults
    pads: Tuple[int, int, int, int] = DEFAULTS["pads"]
    nosmooth: bool = DEFAULTS["nosmooth"]
    box: Tuple[int, int, int, int] = NO_BOX
    detection: DetectionSettings = DetectionSettings()

    def record(self) -> dict:
        """The settings as avatar.json records and compares them, by flag name (lists for several
        values); the detection settings and the detector's weights (by name and size) only without a
        fixed box."""
        detect = tuple(self.box) == NO_BOX
        d = {}
        for s in AVATAR:
            if detect or not _is_detection(s):
                value = _attribute(self, s.avatar)
                d[s.name] = list(value) if s.nargs else value
        if detect:
            d["detector_weights"] = self.detection.weights()
        return d

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> "AvatarSettings":
        """The settings :meth:`record` gave (a record without detection settings: the published
        detection). Raises KeyError for a missing setting, TypeError / ValueError for a wrong value."""
        return _assemble({s.name: rec[s.name] for s in AVATAR if s.name in rec or not _is_detection(s)})


def settings_from_flags(flags: Mapping[str, Any]) -> AvatarSettings:
    """The avatar settings of inference flag values (``flags`` by flag name; one left out takes its
    default), auto resolved: ``det_every`` None is 1 in parity mode, else every
    ``DEFAULT_DET_EVERY``-th frame; ``det_scale`` 0 is full size in parity mode (else 0: by the frame
    size); S3FD runs in fp16 outside parity mode unless the precision asked for is fp32 or bf16, and
    ``target_face largest`` is tracked outside parity mode (each frame's best face in it).
    Raises SettingError for flags that contradict their ``preset``."""
    values = with_preset({**DEFAULTS, **flags})
    parity = is_published(values)
    if values["det_every"] is None:
        values["det_every"] = 1 if parity else DEFAULT_DET_EVERY
    if values["det_scale"] <= 0 and parity:
        values["det_scale"] = 1.0
    half = not parity and (values["precision"] in ("fp16", "auto") or values["half"])
    return _assemble(values, s3fd_path=values["s3fd_path"], batch_size=values["face_det_batch_size"], half=half,
                     track_largest=not parity)


def _is_detection(setting) -> bool:
    return setting.avatar.startswith("detection.")


def _attribute(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def _assemble(values: Mapping[str, Any], **detection) -> AvatarSettings:
    """AvatarSettings of avatar setting ``values`` by flag name (each read as its setting's type;
    one left out keeps the class default); ``detection``: DetectionSettings fields avatar.json does
    not record. Raises TypeError / ValueError for a value of the wrong type."""
    parts = {"": {}, "transform": {}, "detection": dict(detection)}
    for s in AVATAR:
        if s.name in values:
            group, _, attr = s.avatar.rpartition(".")
            parts[group][attr] = s.value(values[s.name])
    return AvatarSettings(transform=FrameTransform(**parts["transform"]),
                          detection=DetectionSettings(**parts["detection"]), **parts[""])
