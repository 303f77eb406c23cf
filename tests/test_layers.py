"""The library's folders are its layers (docs/architecture.md): a module imports only its own layer
and the layers below it, and no module grows past about 400 lines.

Lowest first: ``lipsync/core`` (errors, device, progress, files, threads), ``lipsync/media`` (ffmpeg,
video, frame sources), the published root modules (``audio.py``, ``hparams.py``, ``models/``,
``face_detection/``: they import only ``lipsync.core`` and ``lipsync.media``), ``lipsync/render``,
``lipsync/eval``, ``lipsync/train``, ``lipsync/serve``. Scripts sit on top and may import anything.
"""
import ast
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAYERS = ["lipsync.core", "lipsync.media", ("audio", "hparams", "models", "face_detection"),
          "lipsync.render", "lipsync.eval", "lipsync.train", "lipsync.serve"]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in ((layer,) if isinstance(layer, str) else layer)}
MAX_LINES = 420   # "about 400"


def layer_of(module: str):
    for name in sorted(RANK, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    return None


def library_files():
    files = glob.glob("lipsync/**/*.py", recursive=True) + ["audio.py", "hparams.py"]
    return sorted(files + glob.glob("models/*.py") + glob.glob("face_detection/*.py"))


def imports(path):
    """(line, module) of every import in ``path``, at any depth (``from a import b`` gives ``a`` and
    ``a.b``; a relative import is resolved against the module's package, so ``from ..render import
    engine`` in ``lipsync/core/x.py`` gives ``lipsync.render`` and ``lipsync.render.engine``)."""
    tree = ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read())
    package = os.path.dirname(path).replace("/", ".").split(".") if os.path.dirname(path) else []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] if node.level else [])
            module = ".".join(p for p in (base, node.module or "") if p)
            yield node.lineno, module
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"


def test_no_module_imports_a_higher_layer():
    os.chdir(ROOT)
    wrong = []
    for path in library_files():
        if path == "lipsync/__init__.py":
            continue
        mine = layer_of(path[:-3].replace("/", ".").replace(".__init__", ""))
        assert mine, f"{path} belongs to no layer: add its folder to LAYERS"
        for line, module in imports(path):
            theirs = layer_of(module)
            if theirs and RANK[theirs] > RANK[mine]:
                wrong.append(f"{path}:{line} ({mine}) imports {module} ({theirs})")
    assert not wrong, "\n".join(wrong)


def test_every_library_module_belongs_to_a_layer_folder():
    os.chdir(ROOT)
    loose = [p for p in glob.glob("lipsync/*.py") if os.path.basename(p) != "__init__.py"]
    assert not loose, f"modules outside the layer folders: {loose}"


def test_no_module_is_over_about_400_lines():
    os.chdir(ROOT)
    scripts = glob.glob("*.py")
    long = {p: n for p in library_files() + scripts
            if (n := sum(1 for _ in open(p, encoding="utf-8"))) > MAX_LINES}
    assert not long, long


def test_the_layer_check_sees_a_violation(tmp_path, monkeypatch):
    """The check above can fail: a core module importing the renderer, absolutely or relatively, is
    caught."""
    assert RANK[layer_of("lipsync.render.engine")] > RANK[layer_of("lipsync.core.errors")]
    assert layer_of("lipsyncx.core") is None and layer_of("models.wav2lip") == "models"
    (tmp_path / "lipsync" / "core").mkdir(parents=True)
    (tmp_path / "lipsync" / "core" / "x.py").write_text("from ..render import engine\nfrom . import errors\n"
                                                        "def f():\n    import lipsync.serve.app\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    found = {m for _, m in imports("lipsync/core/x.py")}
    assert {"lipsync.render.engine", "lipsync.core.errors", "lipsync.serve.app"} <= found
