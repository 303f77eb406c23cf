"""Installing requirements.txt gives one OpenCV: naming two (or one that a dependency does not use)
puts two copies of cv2 into one folder, where they overwrite each other."""
import importlib.metadata as md
import os
import re

from conftest import ROOT

OPENCV = re.compile(r"^opencv(-contrib)?-python(-headless)?$")


def dist_name(requirement: str) -> str:
    """The normalised distribution name at the start of a requirement line ("" for none)."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return re.sub(r"[-_.]+", "-", m.group(1)).lower() if m else ""


def requirement_names(path: str) -> list:
    names = []
    for line in open(path, encoding="utf-8"):
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            names += requirement_names(os.path.join(os.path.dirname(path), line[3:].strip()))
        elif line and not line.startswith("-"):
            names.append(dist_name(line))
    return names


def dependencies(name: str, seen: set) -> set:
    """The installed distribution ``name`` and everything it requires (extras left out), by name."""
    if name in seen:
        return set()
    seen.add(name)
    try:
        requires = md.requires(name) or []
    except md.PackageNotFoundError:
        return {name}
    found = {name}
    for req in requires:
        if "extra ==" in req.replace("extra==", "extra =="):
            continue
        found |= dependencies(dist_name(req), seen)
    return found


def test_requirements_name_one_opencv():
    names = requirement_names(os.path.join(ROOT, "requirements-dev.txt"))
    assert [n for n in names if OPENCV.match(n)] == ["opencv-python"]


def test_dependencies_agree_on_that_opencv():
    """What the requirements pull in (face-alignment requires opencv-python) adds no other OpenCV.
    Read from the installed packages' metadata, so a dependency that changes its choice is seen."""
    seen: set = set()
    closure = set()
    for name in requirement_names(os.path.join(ROOT, "requirements-dev.txt")):
        closure |= dependencies(name, seen)
    assert sorted(n for n in closure if OPENCV.match(n)) == ["opencv-python"]


def test_environment_has_one_opencv():
    names = {dist_name(d.metadata["Name"] or "") for d in md.distributions()}
    installed = sorted(n for n in names if OPENCV.match(n))
    assert len(installed) <= 1, (
        f"two OpenCV distributions are installed ({', '.join(installed)}), sharing one cv2 folder: "
        f"pip uninstall -y {' '.join(installed)} && pip install -r requirements.txt")
