"""The repository has a licence, the README names it and what it does not cover, and every default
dependency appears in the README's licence table (a new one must be checked before it is added)."""
import os
import re

from conftest import ROOT
from test_install import requirement_names


def readme_licence_section() -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    m = re.search(r"^## Licence\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, "README.md has no '## Licence' section"
    return m.group(1)


def test_licence_file_is_mit_and_the_readme_names_it():
    text = open(os.path.join(ROOT, "LICENSE"), encoding="utf-8").read()
    assert text.startswith("MIT License") and "Permission is hereby granted, free of charge" in text
    section = readme_licence_section()
    assert "MIT licence (`LICENSE`)" in section
    for not_covered in ("wav2lip_gan.pth", "lipsync_expert.pth", "LRS2", "s3fd.pth", "non-commercial"):
        assert not_covered in section, not_covered


def test_every_default_dependency_is_in_the_licence_table():
    section = readme_licence_section().lower().replace("_", "-")
    for name in requirement_names(os.path.join(ROOT, "requirements.txt")):
        assert re.search(rf"[| ,]{re.escape(name)}[ ,|]", section), f"{name} is not in the README's licence table"
