"""Package list only (everything else is in pyproject.toml).

kernels/ lives at the repository's top level (one folder per op) but installs as megaxatl.kernels;
setuptools needs that sub-tree listed explicitly to map it, in editable installs too.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["megaxatl", "megaxatl.*"])
    + ["megaxatl.kernels"]
    + [f"megaxatl.kernels.{p}" for p in find_packages("kernels")],
)
