"""Package list only (everything else is in pyproject.toml).

The kernel sources live in the repository's top-level kernels/ folder, in kernels/src/, and install
as megaxatl.kernels; setuptools needs that sub-tree listed explicitly to map it, in editable
installs too. kernels/ itself has no __init__.py so that the repository root on sys.path can never
answer `import kernels` (Hugging Face's kernel hub) with our code.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["megaxatl", "megaxatl.*"])
    + ["megaxatl.kernels"]
    + [f"megaxatl.kernels.{p}" for p in find_packages("kernels/src")],
)
