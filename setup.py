"""Build step of `pip install .` (the metadata is in pyproject.toml): the wheel's `lib_ortholora/ui/assets`
gets the tab's style.css and javascript/ from the repository's top level, where the webui injects
them from, so the standalone `ortholora ui` has them too. One copy in the repository, made at build time."""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
ASSETS = ["style.css", *(p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "javascript").glob("*.js")))]


class BuildWithAssets(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib, "lib_ortholora", "ui", "assets")
        for name in ASSETS:
            dest = target / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            self.copy_file(str(ROOT / name), str(dest))


setup(cmdclass={"build_py": BuildWithAssets})
