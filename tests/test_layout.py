"""The README's Layout section is the folder list: every package of src/tm4 and every
module in it is named there, and src/tm4 itself holds only packages (issue 10)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "src" / "tm4"


def layout_block() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Layout")
    return text[start:text.index("```", text.index("```", start) + 3)]


def test_src_tm4_holds_only_packages() -> None:
    loose = sorted(p.name for p in PKG.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert not loose, f"modules outside any package: {loose}"


def test_every_package_and_module_is_in_the_readme_layout() -> None:
    block = layout_block()
    packages = sorted(p.parent for p in PKG.glob("*/__init__.py"))
    assert len(packages) >= 12
    missing = [f"{p.name}/" for p in packages if f"  {p.name}/" not in block]
    for pkg in packages:
        for mod in pkg.glob("*.py"):
            if not mod.name.startswith("__") and mod.stem not in block:
                missing.append(f"{pkg.name}/{mod.name}")
    assert not missing, f"not in the README's Layout section: {missing}"
