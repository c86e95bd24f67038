"""Nothing of ours answers to another distribution's top-level name.

`kernels` is Hugging Face's kernel hub (PyPI `kernels`; transformers imports it when installed).
`python -m pytest`, `python -m megaxatl ...` and `python -c` put the working directory first on
sys.path, so these run in fresh interpreters from the repository root, as a user would, in two
environments: this venv (which has the real `kernels`: transformers depends on it) and the same
site-packages without it (a site folder of links to every entry but `kernels`, loaded with
`python -S` + site.addsitedir, so its .pth files, our editable install among them, still apply).
In both, transformers loads a tokenizer and a GGUF donor, and `megaxatl info` works.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from fixtures_donors import make_tiny_gguf, write_tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent

CHECK = r"""
import importlib, importlib.util, json, sys
out = {"path0": sys.path[0]}
spec = importlib.util.find_spec("kernels")
out["kernels_origin"] = None if spec is None else spec.origin
out["kernels_locations"] = None if spec is None else list(spec.submodule_search_locations or [])
try:
    import kernels.src
    out["kernels_src"] = "imported"
except ImportError as e:
    out["kernels_src"] = type(e).__name__
from transformers.utils import import_utils
out["kernels_available"] = import_utils.is_kernels_available()
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
out["tokens"] = tok("w3 w4 w5")["input_ids"]
from megaxatl.donors import open_donor
donor = open_donor(sys.argv[2])
out["donor"] = [donor.format, donor.spec.family, len(donor)]
import megaxatl.kernels
out["megaxatl_kernels"] = megaxatl.kernels.__file__
print("RESULT " + json.dumps(out))
"""


def _site_without_kernels(tmp: Path) -> Path:
    site = Path(sysconfig.get_paths()["purelib"])
    overlay = tmp / "site-without-kernels"
    overlay.mkdir()
    for entry in site.iterdir():
        if entry.name == "kernels" or (entry.name.startswith("kernels-") and entry.name.endswith(".dist-info")):
            continue
        (overlay / entry.name).symlink_to(entry)
    return overlay


def _python(overlay: Path | None, run: str) -> list[str]:
    """`python -c` from the root (sys.path starts with it) running `run`. With an overlay the
    interpreter starts without site (the venv's own site-packages, with `kernels`, is never
    added) and adds the overlay as a site folder."""
    if overlay is None:
        return [sys.executable, "-c", f"import runpy, sys; {run}"]
    return [sys.executable, "-S", "-c", f"import runpy, site, sys; site.addsitedir({str(overlay)!r}); {run}"]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("isolation")
    tok = write_tiny_tokenizer(tmp / "tok", 32)
    _, gguf = make_tiny_gguf(tmp / "tiny.gguf")
    script = tmp / "check.py"
    script.write_text(CHECK)
    return tmp, tok, gguf, script


@pytest.mark.parametrize("real_kernels", [True, False], ids=["with-kernels", "without-kernels"])
def test_repo_root_never_answers_import_kernels(inputs, tmp_path, real_kernels):
    tmp, tok, gguf, script = inputs
    overlay = None if real_kernels else _site_without_kernels(tmp_path)
    run = f"sys.argv = sys.argv[1:]; runpy.run_path({str(script)!r}, run_name='__main__')"
    cmd = _python(overlay, run) + [str(script), str(tok), str(gguf)]
    proc = _run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert out["tokens"] == [3, 4, 5]
    assert out["donor"] == ["gguf", "llama", out["donor"][2]] and out["donor"][2] > 0
    assert Path(out["megaxatl_kernels"]).resolve() == ROOT / "kernels" / "src" / "__init__.py"
    assert out["kernels_src"] in ("ModuleNotFoundError", "ImportError")  # never our ops under `kernels`
    if real_kernels:
        real = Path(out["kernels_origin"]).resolve()
        assert ROOT / "kernels" not in real.parents and real.parent.parent.name == "site-packages"
        import kernels

        assert real == Path(kernels.__file__).resolve()
        assert out["kernels_available"] is True
    else:
        # at most an empty namespace portion (the folder exists), which transformers sees through
        assert out["kernels_origin"] in (None, "namespace")
        assert out["kernels_available"] is False


@pytest.mark.parametrize("real_kernels", [True, False], ids=["with-kernels", "without-kernels"])
def test_python_m_megaxatl_info_from_the_root(tmp_path, real_kernels):
    overlay = None if real_kernels else _site_without_kernels(tmp_path)
    # what `python -m megaxatl info` does: the root first on sys.path, then the package's __main__
    run = "sys.argv = ['megaxatl', 'info', '--config', 'configs/tiny_hybrid.json']; runpy.run_module('megaxatl', run_name='__main__')"
    cmd = _python(overlay, run)
    proc = _run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kernel backends" in proc.stdout and "tiny_hybrid.json" in proc.stdout
    assert "DeepSpeed      yes" in proc.stdout
