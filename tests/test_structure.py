"""Project-wide rules: the import rules of docs/design.md (checked with ast), `--help` on every entry point,
and no code path that unpickles (safetensors for tensors, weights_only=True for torch.load)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
LIBS = ("autoencoder", "diffusion", "data", "evaluation")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {node.module.split(".")[0], node.module}
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            mod = path.parent.name if node.level == 1 else None
            if mod and node.module:
                found |= {f"{mod}.{node.module}", f"{mod}.{node.module}".split(".")[0]}
            for a in node.names:
                found.add(f"{mod}.{a.name}" if mod else a.name)
    return found


LEAF = "data.files"  # the one module every library may import (file safety, stable hashing)


def _project_imports(path: Path) -> set[str]:
    """Top-level project packages that `path` imports, not counting the leaf module."""
    mods = {m for m in _imports(path) if m != LEAF and not m.startswith(LEAF + ".")}
    # `from data.files import x` also records "data" and "data.files.x": drop what came from the leaf only
    if LEAF in _imports(path) and not any(m.startswith("data.") and not m.startswith(LEAF) for m in mods):
        mods.discard("data")
    return {m.split(".")[0] for m in mods}


# a library may use the ones listed here (a layer above them), never the other way round
LAYERS = {"evaluation": {"data"}}  # scoring uses the synthetic tracker and the video reader


@pytest.mark.parametrize("lib", LIBS)
def test_libraries_do_not_import_each_other_or_scripts(lib):
    forbidden = {"scripts", *LIBS} - {lib} - LAYERS.get(lib, set())
    bad = []
    for path in (ROOT / lib).rglob("*.py"):
        hit = _project_imports(path) & forbidden
        if hit:
            bad.append(f"{path.relative_to(ROOT)} imports {sorted(hit)}")
    assert not bad, bad


def test_the_leaf_module_imports_no_project_code():
    tree = ast.parse((ROOT / "data" / "files.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0]
    assert not {m.split(".")[0] for m in _imports(ROOT / "data" / "files.py")} & {"scripts", *LIBS}


def test_unet_is_network_only():
    mods = _imports(ROOT / "diffusion" / "unet3d.py")
    bad = {m for m in mods if any(m.startswith(f"diffusion.{x}") for x in ("process", "sampling", "guidance"))}
    bad |= {m for m in mods if m in ("process", "sampling", "guidance")}
    assert not bad, bad


def test_samplers_do_not_import_the_network():
    for name in ("sampling.py", "guidance.py", "process.py", "schedules.py"):
        mods = _imports(ROOT / "diffusion" / name)
        assert not {m for m in mods if "unet3d" in m}, name


def test_import_checker_catches_a_violation(tmp_path):
    bad = tmp_path / "data" / "x.py"
    bad.parent.mkdir()
    bad.write_text("from autoencoder.model import FrameVAE\nimport diffusion.unet3d\n")
    assert {"autoencoder", "diffusion"} <= _project_imports(bad)
    leaf_only = tmp_path / "autoencoder" / "y.py"
    leaf_only.parent.mkdir()
    leaf_only.write_text("from data.files import sha256_file\n")
    assert _project_imports(leaf_only) == set()
    leaf_and_more = tmp_path / "autoencoder" / "z.py"
    leaf_and_more.write_text("from data.files import sha256_file\nfrom data.shards import load_manifest\n")
    assert _project_imports(leaf_and_more) == {"data"}


ENTRY_POINTS = sorted(
    v.split(":")[0] for v in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"].values()
)


def test_every_script_module_is_an_entry_point():
    modules = {f"scripts.{p.stem}" for p in (ROOT / "scripts").glob("*.py") if p.stem != "__init__"}
    assert modules == set(ENTRY_POINTS)


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help(module):
    r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout
    if module not in ("scripts.verify_shards", "scripts.benchmark", "scripts.evaluate", "scripts.report"):
        assert "--output-dir" in r.stdout


def _source_files():
    for d in (*LIBS, "scripts"):
        yield from (ROOT / d).rglob("*.py")


PICKLE_MODULES = ("pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal")
# TorchScript archives are read by TorchScript's own deserializer (no arbitrary globals; see
# tests/test_evaluation.py's malicious-archive test): allowed in the one loader that checks the hash
# and refuses torch.save pickles first, nowhere else
JIT_LOAD_ALLOWED = "evaluation/detectors.py"


def _load_aliases(tree) -> tuple[set[str], set[str]]:
    """Spellings that reach torch.load and np.load in one module, imports with `as` included."""
    torch_load, np_load = {"torch.load", "torch.serialization.load"}, {"np.load", "numpy.load"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in ("torch", "numpy") and a.asname:
                    (torch_load if a.name == "torch" else np_load).add(f"{a.asname}.load")
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization", "numpy"):
            for a in node.names:
                if a.name == "load":
                    (np_load if node.module == "numpy" else torch_load).add(a.asname or "load")
    return torch_load, np_load


def unpickling_calls(source: str, name: str) -> list[str]:
    """Every place in `source` that imports a pickle module, calls torch.load without
    weights_only=True, or np.load without an explicit allow_pickle=False."""
    tree, bad = ast.parse(source), []
    torch_load, np_load = _load_aliases(tree)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            if any(n.split(".")[0] in PICKLE_MODULES for n in names):
                bad.append(f"{name}:{node.lineno} imports a pickle module")
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if func in torch_load and kw.get("weights_only") != "True":
            bad.append(f"{name}:{node.lineno} torch.load without weights_only=True")
        if func in np_load and kw.get("allow_pickle") != "False":
            bad.append(f"{name}:{node.lineno} np.load without an explicit allow_pickle=False")
        if func.endswith("jit.load") and not name.replace("\\", "/").endswith(JIT_LOAD_ALLOWED):
            bad.append(f"{name}:{node.lineno} torch.jit.load outside {JIT_LOAD_ALLOWED}")
    return bad


def test_the_unpickling_scan_catches_aliases():
    cases = {"import pickle": 1, "from joblib import load": 1, "import torch\ntorch.load(p)": 1,
             "import torch as T\nT.load(p, weights_only=False)": 1, "from torch import load\nload(p)": 1,
             "from torch import load as tl\ntl(p)": 1, "import numpy as xp\nxp.load(p)": 1,
             "from numpy import load\nload(p, allow_pickle=True)": 1,
             "import torch\ntorch.load(p, weights_only=True)": 0, "import numpy as np\nnp.load(p, allow_pickle=False)": 0,
             "import json\njson.load(f)": 0, "import torch\ntorch.jit.load(p)": 1}  # fmt: skip
    assert {src: len(unpickling_calls(src, "x.py")) for src in cases} == cases
    assert not unpickling_calls("import torch\ntorch.jit.load(p)", "/repo/evaluation/detectors.py")


def test_no_unpickling_anywhere():
    """torch.load needs weights_only=True; pickle / np.load(allow_pickle=True) never appear."""
    bad = [b for path in _source_files() for b in unpickling_calls(path.read_text(), str(path))]
    assert not bad, bad
