"""Uploads: the multipart form of a request read within the server's limits, files judged by their
content (never their name), and the inference settings a form may set (their names and defaults
are those of :data:`lipsync.render.settings.INFERENCE`). Routes get it all from the :class:`Uploads`
dependency.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
from typing import Optional, Tuple

from fastapi import Depends, Request

from lipsync.render.settings import SETTINGS
from lipsync.render.tracking import is_target_face
from lipsync.serve.state import ApiError, ServerConfig, ServerState, get_state

log = logging.getLogger(__name__)

UPLOAD_CHUNK = 1 << 20
# the inference settings a form may set: what a malformed value must be instead, and a range check
FORM_FIELDS = {"box": ("four integers 'top bottom left right' (pixels)", None),
               "fps": ("a number of frames per second in (0, 240]", lambda fps: 0 < fps <= 240),
               "target_face": ("largest, a face number N (0: the leftmost) or a pixel X,Y", is_target_face)}


class _TooLarge(Exception):
    pass


async def read_form(request, limit_bytes: int):
    """The multipart form of ``request``, refusing (ApiError 413) a body over ``limit_bytes``: by its
    Content-Length before reading anything, else as soon as the bytes received pass the limit.
    Uploaded files stay in Starlette's anonymous temporary files, so a refusal keeps nothing."""
    mb = limit_bytes / 2 ** 20
    too_large = ApiError(413, f"the upload is larger than this server's limit of {mb:g} MB (--max_upload_mb)")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit_bytes:
        raise too_large
    received = 0

    async def receive():
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit_bytes:
                raise _TooLarge()
        return message

    try:
        return await Request(request.scope, receive).form(max_files=4, max_fields=16)
    except _TooLarge:
        raise too_large from None


# Containers an upload may be (ffmpeg demuxer names): self-contained media files. Playlists and
# manifests (hls, dash, concat) and the like name other files, which ffmpeg would then read from
# this server's disk, so they are refused whatever their name.
UPLOAD_FORMATS = frozenset({
    "mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm", "avi", "flv", "asf", "mpegts", "mpeg", "mpegvideo",
    "m4v", "h264", "hevc", "mjpeg", "gif", "nut", "mxf", "dv", "ogg", "wav", "w64", "mp3", "aac", "flac", "aiff",
    "caf", "amr", "ac3", "eac3", "wv", "au", "image2", "apng",
})


def upload_format_ok(format_name: str) -> bool:
    """Whether ffmpeg's demuxer names for a file (``MediaInfo.format``) are all in
    :data:`UPLOAD_FORMATS` or image pipes (``png_pipe``, ``jpeg_pipe``, ...)."""
    names = [n for n in format_name.split(",") if n]
    return bool(names) and all(n in UPLOAD_FORMATS or n.endswith("_pipe") for n in names)


def media_kinds(path: str) -> set:
    """What a file holds, judged by its content (not its name): {"image"} for a still photo, else
    the streams ffmpeg finds, a subset of {"video", "audio"} (empty: not media ffmpeg reads, or a
    container that is not a self-contained file: see :data:`UPLOAD_FORMATS`)."""
    from lipsync.media.ffmpeg import MediaError, image_signature
    from lipsync.media.probe import probe_media

    with open(path, "rb") as fh:
        if image_signature(fh.read(32)):
            return {"image"}
    try:
        info = probe_media(path)
    except (MediaError, OSError):
        return set()
    if not upload_format_ok(info.format):
        log.warning("refused an upload in the %r format (not a self-contained media file)", info.format)
        return set()
    return {kind for kind, stream in (("video", info.video), ("audio", info.audio)) if stream is not None}


def media_limits(path: str, config: ServerConfig, what: str) -> None:
    """Refuse (ApiError 422) an uploaded face whose frames have more than ``max_frame_pixels`` pixels
    or that lasts more than ``max_avatar_seconds`` (``what`` "face"), or audio longer than
    ``max_audio_seconds`` (``what`` "audio"): a small file can otherwise decode to gigabytes."""
    from lipsync.media.ffmpeg import MediaError
    from lipsync.media.probe import probe_media

    try:
        info = probe_media(path)
    except (MediaError, OSError):
        return  # not probed here: the engine reports what is wrong with it
    if what == "audio":
        stream = info.audio
        seconds = max(info.duration, stream.end or 0.0 if stream else 0.0)
        if seconds > config.max_audio_seconds:
            raise ApiError(422, f"the audio lasts {seconds:.1f} s; this server takes at most "
                                f"{config.max_audio_seconds:g} s (--max_audio_seconds)")
        return
    video = info.video
    if video is None:
        return
    if video.width * video.height > config.max_frame_pixels:
        raise ApiError(422, f"the face's frames are {video.width}x{video.height} pixels; this server takes at most "
                            f"{config.max_frame_pixels} pixels per frame (--max_frame_pixels): scale it down")
    seconds = max(info.duration, video.end or 0.0)
    if seconds > config.max_avatar_seconds:
        raise ApiError(422, f"the face video lasts {seconds:.1f} s on its timeline; this server takes at most "
                            f"{config.max_avatar_seconds:g} s (--max_avatar_seconds)")


async def save_upload(upload, folder: str, name: str) -> str:
    """Copy an uploaded file into ``folder/name`` (a name the server chose); returns the path."""
    path = os.path.join(folder, name)

    def copy():
        upload.file.seek(0)
        with open(path, "wb") as out:
            shutil.copyfileobj(upload.file, out, UPLOAD_CHUNK)

    await asyncio.to_thread(copy)
    return path


def form_setting(form, name: str):
    """The form field ``name`` (one of :data:`FORM_FIELDS`; several values separated by spaces or
    commas) read as its setting's type; the setting's default when it is missing or blank. ApiError
    422 when it is malformed."""
    text, setting = text_field(form, name), SETTINGS[name]
    if text is None or not text.strip():
        return setting.default
    hint, in_range = FORM_FIELDS[name]
    try:
        value = setting.value(text.replace(",", " ").split() if setting.nargs else text)
    except (TypeError, ValueError):
        value = None
    if value is None or (in_range is not None and not in_range(value)):
        raise ApiError(422, f"{name} must be {hint}, got {text[:60]!r}")
    return value


def text_field(form, name: str) -> Optional[str]:
    """A text field of ``form`` (None when missing); ApiError 422 when it is a file."""
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(422, f"form field {name!r} must be text, not a file")
    return value


def file_field(form, name: str):
    """A file field of ``form`` (None when missing); ApiError 422 when it is text."""
    value = form.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        raise ApiError(422, f"form field {name!r} must be a file upload")
    return value


class Uploads:
    """Dependency of the upload routes: the server's limits on a request (body size and time, media
    size and length), staging a face or audio upload (judged by content), and the inference flags a
    form gives (its fields, the server's detector)."""

    def __init__(self, state: ServerState = Depends(get_state)):
        self.config = state.config

    @property
    def limit_bytes(self) -> int:
        """The largest request body, bytes (``--max_upload_mb``)."""
        return int(self.config.max_upload_mb * 2 ** 20)

    async def form(self, request: Request):
        """The request's multipart form (see :func:`read_form`); ApiError 408 when the body has not
        arrived within ``upload_timeout`` seconds."""
        try:
            return await asyncio.wait_for(read_form(request, self.limit_bytes), self.config.upload_timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the upload did not arrive within {self.config.upload_timeout:g} s "
                                "(--upload_timeout)") from None

    def flags(self, form) -> dict:
        """The inference flags of ``form``: :data:`FORM_FIELDS` and the server's face detector."""
        flags = {name: form_setting(form, name) for name in FORM_FIELDS}
        return {**flags, "face_detector": self.config.face_detector, "s3fd_path": self.config.s3fd_path}

    async def staged_face(self, form, staging: str) -> Tuple[str, str]:
        """The face upload (field ``face`` or ``file``) saved in ``staging``: (path, "image" or
        "video"). ApiError 422 when missing or over the media limits, 415 when not a video or photo."""
        upload = file_field(form, "face") if "face" in form else file_field(form, "file")
        if upload is None:
            raise ApiError(422, "missing the face: a multipart file field 'file' (a video or photo)")
        path = await save_upload(upload, staging, "face")
        kinds = await asyncio.to_thread(media_kinds, path)
        if not kinds & {"image", "video"}:
            raise ApiError(415, f"the uploaded face {upload.filename!r} is not a video or photo this server can read "
                                f"(judged by its content{'; it is audio' if kinds else ''})")
        await asyncio.to_thread(media_limits, path, self.config, "face")
        return path, "image" if "image" in kinds else "video"

    async def staged_audio(self, form, staging: str) -> str:
        """The ``audio`` upload saved in ``staging``; ApiError 422 when missing or too long, 415 when
        it holds no audio."""
        upload = file_field(form, "audio")
        if upload is None:
            raise ApiError(422, "missing the speech: a multipart file field 'audio'")
        path = await save_upload(upload, staging, "audio")
        if "audio" not in await asyncio.to_thread(media_kinds, path):
            raise ApiError(415, f"the uploaded audio {upload.filename!r} is not audio this server can "
                                "read (judged by its content: no audio stream)")
        await asyncio.to_thread(media_limits, path, self.config, "audio")
        return path
