"""The server's avatars: folders under one directory, named by server-made ids, loaded once and shared.

Each avatar is an avatar folder (:mod:`lipsync.render.avatar`) at ``<root>/<id>``, ``id`` 16 lowercase hex
digits made by the server. Any other name (``../..``, an absolute path, a typo) is "not found":
no path built from a client's string ever reaches the file system. A folder appears complete or not
at all (:func:`lipsync.render.avatar.save_avatar` writes a hidden ``.partial`` folder and renames it);
leftovers of an interrupted run (``.partial``, ``.old``, ``.deleting`` folders, ``.staging``) are
removed at start and at shutdown. Folders survive restarts: the store lists what is on disk.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
from collections import Counter, OrderedDict
from typing import Callable, Dict, List, Optional

from lipsync.render.avatar import Avatar, AvatarError, load_avatar, prepare_avatar, read_avatar_meta, save_avatar
from lipsync.render.avatar_settings import AvatarSettings
from lipsync.core.errors import Wav2LipError

log = logging.getLogger(__name__)

AVATAR_ID = re.compile(r"[0-9a-f]{16}")
STAGING = ".staging"  # uploads being received or prepared; never an avatar


class AvatarNotFound(Wav2LipError, LookupError):
    """No avatar with that id (or not an id this server makes)."""


class AvatarInUse(Wav2LipError, RuntimeError):
    """The avatar is used by a running session and cannot be deleted now."""


def describe(avatar_id: str, meta: dict) -> dict:
    """The JSON the API returns for an avatar: id, frames, fps (frames/s), width and height (pixels)."""
    return {"avatar_id": avatar_id, "frames": int(meta["frames"]), "fps": float(meta["fps"]),
            "width": int(meta.get("width", 0)), "height": int(meta.get("height", 0)),
            "source_kind": meta.get("source_kind"), "img_size": int(meta["img_size"]),
            "created": meta.get("created")}


class AvatarStore:
    """Avatars under ``root`` for a generator of face size ``img_size``.

    ``hold_mb``: decoded frames of a loaded avatar are kept in memory up to this size (then every
    session decodes the source itself). ``max_loaded``: loaded avatars kept when unused (least
    recently used go first). ``on_unload(avatar)`` is called when a loaded avatar is dropped (the
    server forgets its cached face features there). Thread-safe.
    """

    def __init__(self, root: str, img_size: int, hold_mb: float = 1024, max_loaded: int = 16,
                 on_unload: Optional[Callable[[Avatar], None]] = None):
        self.root = os.path.abspath(root)
        self.img_size = img_size
        self.hold_mb = hold_mb
        self.max_loaded = max_loaded
        self.on_unload = on_unload
        os.makedirs(self.root, exist_ok=True)
        self._lock = threading.RLock()
        self._loaded: "OrderedDict[str, Avatar]" = OrderedDict()
        self._users: Counter = Counter()
        self._loading: Dict[str, threading.Lock] = {}

    # ---- names ----------------------------------------------------------------------------------
    def folder(self, avatar_id: str) -> str:
        """The folder of ``avatar_id``; raises AvatarNotFound for a name the server did not make or
        an avatar that is not (or no longer) there."""
        if not isinstance(avatar_id, str) or not AVATAR_ID.fullmatch(avatar_id):
            raise AvatarNotFound(f"no avatar {avatar_id!r}")
        path = os.path.join(self.root, avatar_id)
        if not os.path.isfile(os.path.join(path, "avatar.json")):
            raise AvatarNotFound(f"no avatar {avatar_id!r}")
        return path

    def ids(self) -> List[str]:
        """Ids of the avatars on disk, sorted."""
        return sorted(n for n in os.listdir(self.root)
                      if AVATAR_ID.fullmatch(n) and os.path.isfile(os.path.join(self.root, n, "avatar.json")))

    def info(self, avatar_id: str) -> dict:
        """:func:`describe` of one avatar; AvatarNotFound, or AvatarError for a damaged avatar.json."""
        return describe(avatar_id, read_avatar_meta(self.folder(avatar_id)))

    def list(self) -> List[dict]:
        """:func:`describe` of every readable avatar (a damaged one is logged and left out)."""
        out = []
        for avatar_id in self.ids():
            try:
                out.append(self.info(avatar_id))
            except (AvatarError, AvatarNotFound) as exc:
                log.warning("avatar %s left out of the list: %s", avatar_id, exc)
        return out

    # ---- making and removing ----------------------------------------------------------------------
    def staging_dir(self) -> str:
        """A new private folder for one request's uploads (remove it when done)."""
        parent = os.path.join(self.root, STAGING)
        os.makedirs(parent, exist_ok=True)
        return tempfile.mkdtemp(prefix="upload.", dir=parent)

    def create(self, face: str, settings: AvatarSettings, device, kind: Optional[str] = None,
               wanted: Callable[[], bool] = lambda: True) -> Optional[dict]:
        """Prepare the face in ``face`` (a video or photo; ``kind`` "video"/"image" when known) and
        save it under a new id; returns its :func:`describe`, or None when ``wanted()`` says, once
        it is prepared, that nobody waits for it any more (then nothing is saved). Raises AvatarError
        (no face found, box outside the frame) or a media error for an unreadable file."""
        avatar = prepare_avatar(face, settings, self.img_size, device=device, cache=None, with_crops=True,
                                progress=False, source_kind=kind)
        if not wanted():
            return None
        avatar_id = secrets.token_hex(8)
        save_avatar(avatar, os.path.join(self.root, avatar_id))
        return self.info(avatar_id)

    def delete(self, avatar_id: str) -> None:
        """Remove an avatar; AvatarNotFound, or AvatarInUse while a session uses it."""
        with self._lock:
            folder = self.folder(avatar_id)
            if self._users[avatar_id]:
                raise AvatarInUse(f"avatar {avatar_id} is used by {self._users[avatar_id]} running session(s); "
                                  "delete it when they have ended")
            # out of sight first (one rename), then removed: a crash leaves a hidden leftover, not half an avatar
            gone = os.path.join(self.root, f".{avatar_id}.{secrets.token_hex(4)}.deleting")
            os.rename(folder, gone)
            avatar = self._loaded.pop(avatar_id, None)
        if avatar is not None and self.on_unload is not None:
            self.on_unload(avatar)
        shutil.rmtree(gone, ignore_errors=True)

    def cleanup(self) -> None:
        """Remove leftovers of interrupted work: unfinished saves, deletions and uploads."""
        for name in os.listdir(self.root):
            path = os.path.join(self.root, name)
            if name == STAGING or (name.startswith(".") and name.endswith((".partial", ".old", ".deleting"))):
                shutil.rmtree(path, ignore_errors=True)

    # ---- using ----------------------------------------------------------------------------------
    def acquire(self, avatar_id: str) -> Avatar:
        """The loaded avatar (loaded and checked the first time; frames held in memory when they fit),
        counted as in use until :meth:`release`. AvatarNotFound, or AvatarError for one that cannot be
        used (damaged, made for another face size)."""
        with self._lock:
            folder = self.folder(avatar_id)
            avatar = self._loaded.get(avatar_id)
            if avatar is not None:
                self._loaded.move_to_end(avatar_id)
                self._users[avatar_id] += 1
                return avatar
            loading = self._loading.setdefault(avatar_id, threading.Lock())
        with loading:  # one load per avatar; others wait for it
            with self._lock:
                avatar = self._loaded.get(avatar_id)
            if avatar is None:
                avatar = load_avatar(folder, self.img_size)
                avatar.hold_frames(self.hold_mb)
            with self._lock:
                self._loading.pop(avatar_id, None)
                self._loaded[avatar_id] = avatar
                self._users[avatar_id] += 1
                self._evict()
        return avatar

    def pin(self, avatar_id: str) -> str:
        """Count ``avatar_id`` as in use (so :meth:`delete` refuses it with AvatarInUse) without loading
        it, until :meth:`release`; returns its folder. AvatarNotFound as :meth:`folder`."""
        with self._lock:
            folder = self.folder(avatar_id)
            self._users[avatar_id] += 1
            return folder

    def release(self, avatar_id: str) -> None:
        """One session stopped using ``avatar_id``."""
        with self._lock:
            if self._users[avatar_id] > 0:
                self._users[avatar_id] -= 1
            if not self._users[avatar_id]:
                del self._users[avatar_id]
            self._evict()

    def _evict(self) -> None:
        unused = [a for a in self._loaded if not self._users[a]]
        while len(self._loaded) > self.max_loaded and unused:
            avatar = self._loaded.pop(unused.pop(0))
            if self.on_unload is not None:
                self.on_unload(avatar)
