"""Every script's --help: each flag has a help text and shows its default, and the help names
only flags the parser has. Scripts are found, not listed: every ``*.py`` at the repository root
and in ``benchmarks/`` that defines ``build_parser()`` or ``main(argv)``."""
import argparse
import contextlib
import glob
import importlib.util
import io
import os
import re
import sys

import pytest

from conftest import ROOT


def scripts():
    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "benchmarks", "*.py"))):
        text = open(path, encoding="utf-8").read()
        if re.search(r"^def build_parser\(", text, re.M) or re.search(r"^def main\(argv", text, re.M):
            found.append(os.path.relpath(path, ROOT))
    return found


def help_of(rel_path, monkeypatch):
    """(help text, parser) of a script, by calling its main(["--help"]) in this process and
    catching the parser that printed it."""
    name = "help_" + re.sub(r"\W", "_", rel_path[:-3])
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, rel_path))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)   # dataclasses look their module up there
    spec.loader.exec_module(module)
    parsers = []
    original = argparse.ArgumentParser.parse_known_args

    def recording(self, *args, **kwargs):
        parsers.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", recording)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code in (0, None)
    assert parsers, f"{rel_path}: main(['--help']) printed help without an argparse parser"
    return out.getvalue(), parsers[0]


def test_scripts_are_found():
    found = scripts()
    for expected in ("inference.py", "demo.py", "preprocess.py", "wav2lip_train.py", "benchmarks/sync_benchmark.py"):
        assert expected in found


@pytest.mark.parametrize("script", scripts())
def test_help_tells_the_truth(script, monkeypatch):
    text, parser = help_of(script, monkeypatch)
    flags = {s for a in parser._actions for s in a.option_strings}
    # every --flag the help mentions (description and epilog included) is one the parser has
    own = os.path.basename(script)
    named = set()
    for line in text.splitlines():
        # a flag after another script's name on the same line is that script's ("sync_correct.py --fix")
        others = [m for m in re.finditer(r"[\w/]+\.py\b", line) if os.path.basename(m.group()) != own]
        line = line[:others[0].start()] if others else line
        named |= set(re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)", line))
    unknown = sorted(named - flags)
    assert not unknown, f"{script} --help names flags its parser does not have: {unknown}"
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{script}: {name} has no help text"
        # the defaults formatter shows "(default: ...)" for every optional flag
        if action.option_strings and not action.required and action.default is not argparse.SUPPRESS:
            shown = parser._get_formatter()._get_help_string(action)
            assert "%(default)" in shown, f"{script}: {name} does not show its default (use lipsync.core.cli.HelpFormatter)"
