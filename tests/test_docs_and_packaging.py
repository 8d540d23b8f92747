"""The repository stands alone and is packaged as documented: every `docs/…md#anchor` that code or
docs cite exists, nothing points outside the repository, the README keeps one section of each
kind and CI's test command, metadata.ini orders our scripts after the built-in Lora extension the
way the webui reads it, pyproject.toml builds the library with its `ortholora` command, and the
module map in DESIGN.md matches the files."""
from __future__ import annotations

import configparser
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"\b(docs/[\w.-]+\.md)(?:#([\w-]+))?")
ANCHOR = re.compile(r'<a id="([\w-]+)"></a>')
README_TEST_COMMAND = ".venv/bin/python -m pytest -q tests"
TEXT = {".py", ".md", ".ini", ".toml", ".txt", ".js", ".css"}


def _text_files() -> list[Path]:
    """The project's own text files (no git needed: the folders it ships, and the top level)."""
    found = [p for p in ROOT.glob("*") if p.is_file() and p.suffix in TEXT] + [ROOT / ".ci" / "run"]
    for folder in ("lib_ortholora", "scripts", "docs", "tests", "javascript"):
        found += [p for p in (ROOT / folder).rglob("*") if p.suffix in TEXT and "__pycache__" not in p.parts]
    return found


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    text = doc.read_text(encoding="utf-8")
    found = set(ANCHOR.findall(text))
    found |= {_slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}
    return found


def test_every_cited_doc_section_exists():
    cited = []
    for path in _text_files():
        for doc, anchor in CITATION.findall(path.read_text(encoding="utf-8", errors="replace")):
            cited.append((path.relative_to(ROOT), doc, anchor))
    assert {doc for _, doc, _ in cited} >= {"docs/formats.md", "docs/webui.md"}
    missing = [(str(where), f"{doc}#{anchor}" if anchor else doc) for where, doc, anchor in cited
               if not (ROOT / doc).is_file() or (anchor and anchor not in anchors(ROOT / doc))]
    assert not missing, missing


def test_in_page_links_of_the_docs_resolve():
    for doc in (ROOT / "docs").glob("*.md"):
        text = doc.read_text(encoding="utf-8")
        targets = set(re.findall(r"\]\(#([\w-]+)\)", text))
        assert targets <= anchors(doc), (doc.name, sorted(targets - anchors(doc)))


def test_nothing_points_outside_the_repository():
    outside = re.compile("|".join(re.escape(s) for s in ("../" + "shared", "shared/" + "docs", "F" + "§", "/" + "work/", "/tmp/" + "pytest-")))
    hits = [str(p.relative_to(ROOT)) for p in _text_files() if outside.search(p.read_text(errors="replace"))]
    assert not hits, hits


def test_readme_has_one_section_of_each_kind_and_ci_runs_its_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    sections = re.findall(r"^## (.+)$", readme, flags=re.M)
    assert len(sections) == len(set(sections)), sections
    assert README_TEST_COMMAND in readme
    assert README_TEST_COMMAND in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def _webui_list(config: configparser.ConfigParser, section: str, key: str) -> list[str]:
    """A requirement list as the webui (1.7–1.10) reads it: lower-cased, split on commas and spaces."""
    return [x for x in re.split(r"[,\s]+", config.get(section, key, fallback="").lower().strip()) if x]


def test_metadata_ini_loads_our_scripts_after_the_builtin_lora_extension():
    config = configparser.ConfigParser()
    assert config.read(ROOT / "metadata.ini", encoding="utf-8")
    assert "lora" in _webui_list(config, "scripts", "After")
    # `Requires = Lora` makes 1.10.1 report the built-in extension as missing (it looks the
    # lower-cased name up under the folder's spelling); `Before` would reverse the order.
    assert "lora" not in _webui_list(config, "Extension", "Requires")
    assert "lora" not in _webui_list(config, "scripts", "Before")
    for script in (ROOT / "scripts").glob("*.py"):
        assert "lora" not in _webui_list(config, f"scripts/{script.name}", "Before")


def test_pyproject_builds_the_library_and_the_ortholora_command(pytestconfig):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    setuptools = project["tool"]["setuptools"]
    assert setuptools["packages"]["find"]["include"] == ["lib_ortholora", "lib_ortholora.*"]
    assert setuptools["dynamic"]["dependencies"]["file"] == ["requirements.txt"]
    assert setuptools["dynamic"]["version"]["attr"] == "lib_ortholora.__version__"
    assert project["project"]["license"] == "MIT" and (ROOT / "LICENSE").is_file()

    module, _, attr = project["project"]["scripts"]["ortholora"].partition(":")
    assert getattr(importlib.import_module(module), attr) is importlib.import_module("lib_ortholora.cli").main

    assert any(m.startswith("slow:") for m in pytestconfig.getini("markers"))


def test_the_module_map_lists_every_module_and_nothing_else():
    """docs/DESIGN.md's module map names each module of lib_ortholora (`name`) and each subpackage
    (`name/`) once, and nothing that is not there."""
    text = (ROOT / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    section = text.split("\n## Module map", 1)[1].split("\n## ", 1)[0]
    cells = re.findall(r"^\| ([^|]+) \|", section, flags=re.M)
    listed = [name for cell in cells for name in re.findall(r"`([\w/]+)`", cell)]
    package = ROOT / "lib_ortholora"
    present = ({p.stem for p in package.glob("*.py") if p.stem != "__init__"}
               | {f"{p.name}/" for p in package.iterdir() if (p / "__init__.py").is_file()})
    assert len(listed) == len(set(listed)), listed
    assert set(listed) == present, (sorted(set(listed) - present), sorted(present - set(listed)))


def test_the_cli_and_the_benchmarks_list_their_modules(capsys, monkeypatch):
    """COMMANDS and benchmarks.NAMES are explicit lists: each names a module of its package and
    every public module (not `_helper`) is named; `--help` shows the name the program was started by."""
    from lib_ortholora import benchmarks, cli

    for package, names in ((cli, cli.COMMANDS), (benchmarks, benchmarks.NAMES)):
        modules = {p.stem for p in Path(package.__file__).parent.glob("*.py") if not p.stem.startswith("_")}
        assert sorted(names) == sorted(modules) and len(names) == len(set(names)), package.__name__
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/ortholora", "--help"])
    with pytest.raises(SystemExit):
        cli.main()
    assert capsys.readouterr().out.startswith("usage: ortholora ")
    shown = subprocess.run([sys.executable, "-m", "lib_ortholora", "--help"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: python -m lib_ortholora "), shown


@pytest.mark.slow
def test_the_wheel_carries_the_tabs_css_and_javascript(tmp_path):
    """`pip install .` gives the standalone UI the same style.css and javascript/*.js the webui injects
    from the extension's top level (copied into the wheel at build time: one copy in the repository)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE", "requirements.txt", "style.css"):
        shutil.copy2(ROOT / name, src / name)
    for folder in ("lib_ortholora", "javascript"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", ".", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")],
                   cwd=src, check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(tmp_path / "site"), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = ("import json, lib_ortholora.ui.app as app; "
            "print(json.dumps([app.__file__, app._asset('style.css'), app._asset('javascript', 'ortholora.js')]))")
    shown = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert shown.returncode == 0, shown.stderr[-2000:]
    where, css, js = json.loads(shown.stdout.strip().splitlines()[-1])
    assert Path(where).is_relative_to(tmp_path / "site")
    assert css == (ROOT / "style.css").read_text(encoding="utf-8") and css
    assert js == (ROOT / "javascript" / "ortholora.js").read_text(encoding="utf-8") and js
