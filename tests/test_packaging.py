"""Packaging and layering: every package folder is listed, and core imports no plug-in folder."""

import ast
import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDERS = {"core": "regc", "frontend": "regc.frontend", "passes": "regc.passes",
           "backends": "regc.backends", "runtime": "regc.runtime"}
PLUGINS = ("regc.frontend", "regc.passes", "regc.backends", "regc.runtime")
# who may import whom (STYLE.md "Layering")
ALLOWED = {
    "regc": (),
    "regc.frontend": (),
    "regc.backends": (),
    "regc.passes": (),
    "regc.runtime": ("regc.backends",),
}


def _config():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _package_name(folder: pathlib.Path) -> str:
    rel = folder.relative_to(ROOT)
    top, *rest = rel.parts
    return ".".join([FOLDERS[top], *rest])


def _package_folders():
    for top in FOLDERS:
        for init in (ROOT / top).rglob("__init__.py"):
            yield init.parent


def test_every_package_folder_is_listed():
    cfg = _config()
    listed = set(cfg["packages"])
    missing = sorted(_package_name(f) for f in _package_folders() if _package_name(f) not in listed)
    assert not missing, f"add these packages to [tool.setuptools] packages and package-dir: {missing}"
    for pkg in listed:
        assert pkg in cfg["package-dir"], f"{pkg} has no package-dir mapping"
        assert (ROOT / cfg["package-dir"][pkg] / "__init__.py").is_file(), f"{pkg} maps to a missing folder"


def test_no_top_level_regc_folder():
    assert not (ROOT / "regc").exists(), "a top-level regc/ folder shadows the installed package"


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                yield "." * node.level + (node.module or ""), node.lineno
            elif node.module:
                yield node.module, node.lineno


def _layer(module: str) -> str | None:
    for p in PLUGINS:
        if module == p or module.startswith(p + "."):
            return p
    return "regc" if module == "regc" or module.startswith("regc.") else None


def test_layering():
    bad = []
    for top, pkg in FOLDERS.items():
        for path in (ROOT / top).rglob("*.py"):
            for mod, line in _imports(path):
                if mod.startswith("."):
                    bad.append(f"{path.relative_to(ROOT)}:{line} relative import '{mod}' (import as regc.*)")
                    continue
                if mod.split(".")[0] in FOLDERS:
                    bad.append(f"{path.relative_to(ROOT)}:{line} bare import '{mod}' (import as regc.*)")
                    continue
                target = _layer(mod)
                if target in (None, "regc", pkg):
                    continue
                if target not in ALLOWED[pkg]:
                    bad.append(f"{path.relative_to(ROOT)}:{line} {pkg} imports {mod}")
    assert not bad, "layering violations:\n" + "\n".join(bad)
