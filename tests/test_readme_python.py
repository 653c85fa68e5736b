"""The README's "## Python" section runs as written: every ```python block, in order, in one
namespace, in a temporary directory holding a copy of the shipped configs."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(readme: str, section: str = "## Python") -> list[str]:
    start = readme.index(f"\n{section}\n")
    end = readme.find("\n## ", start + 1)
    body = readme[start : end if end != -1 else len(readme)]
    return re.findall(r"^```python\n(.*?)^```", body, flags=re.DOTALL | re.MULTILINE)


def test_the_section_has_code() -> None:
    blocks = python_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(blocks) >= 4
    text = "\n".join(blocks)
    for name in ("Mixture(", ".predict(", ".sample(", "ppl_gmm.run(", "ppl_gmm.load(", "ppl_gmm.assign("):
        assert name in text


def test_python_section_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for i, block in enumerate(python_blocks((ROOT / "README.md").read_text(encoding="utf-8"))):
        exec(compile(block, f"README.md ## Python, block {i + 1}", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "new-assignments.csv").is_file()
    assert len(list((tmp_path / "runs").iterdir())) == 2
