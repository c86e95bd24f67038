"""Build one CUDA library from its sdist for this GPU only, for the prepared GPU check (no network).

    python benchmarks/gpu_build_ext.py causal-conv1d .whl/causal_conv1d-1.7.0.tar.gz --target /tmp/site
    python benchmarks/gpu_build_ext.py mamba-ssm .whl/mamba_ssm-2.3.2.post1.tar.gz --target /tmp/site

The sdist's Python package is copied to --target; its C++/CUDA extension (causal_conv1d_cuda,
selective_scan_cuda) is compiled from the sdist's own sources with the flags of its own setup.py
(`extra_compile_args` there, copied below), but for this device's compute capability alone: the
setup.py of both hard-codes nine architectures (sm_75 ... sm_121), several times the build time
the check has. torch.utils.cpp_extension.load compiles with ninja (MAX_JOBS parallel jobs); the
module lands in --target, where `import causal_conv1d_cuda` / `import selective_scan_cuda` finds
it. Exit 0 only when the module built and imports; the check's summary reports anything else as
NOT CHECKED. With no CUDA device or no nvcc it exits 3 at once (the smoke run on CPU).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import tarfile
import tempfile
import time

LIBS = {  # name -> (python package, extension module, csrc folder inside the sdist)
    "causal-conv1d": ("causal_conv1d", "causal_conv1d_cuda", "csrc"),
    "mamba-ssm": ("mamba_ssm", "selective_scan_cuda", "csrc/selective_scan"),
}
# setup.py's nvcc flags (both libraries use the same list), without its -std=c++17: torch's
# cpp_extension adds the standard its own headers need (c++20 in recent releases)
NVCC = ["-O3", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
        "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math", "-lineinfo"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("lib", choices=sorted(LIBS))
    p.add_argument("sdist")
    p.add_argument("--target", required=True, help="folder on PYTHONPATH that receives package + module")
    p.add_argument("--python-only", action="store_true", help="copy the Python package, build nothing")
    args = p.parse_args(argv)
    package, module, csrc = LIBS[args.lib]
    work = tempfile.mkdtemp(prefix=f"build-{package}-")
    with tarfile.open(args.sdist) as tar:
        tar.extractall(work, filter="data")
    (root,) = [d for d in glob.glob(os.path.join(work, "*")) if os.path.isdir(d)]
    os.makedirs(args.target, exist_ok=True)
    shutil.rmtree(os.path.join(args.target, package), ignore_errors=True)
    shutil.copytree(os.path.join(root, package), os.path.join(args.target, package))
    print(f"{args.lib}: Python package copied to {args.target}/{package}", flush=True)
    if args.python_only:
        return 0
    import torch
    from torch.utils import cpp_extension

    if not torch.cuda.is_available() or cpp_extension.CUDA_HOME is None:
        print(f"{args.lib}: not built: no CUDA device or no nvcc (CUDA_HOME {cpp_extension.CUDA_HOME})", flush=True)
        return 3
    major, minor = torch.cuda.get_device_capability(0)
    arch = f"{major}{minor}"
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"  # what cpp_extension adds on its own
    sources = sorted(glob.glob(os.path.join(root, csrc, "*.cpp")) + glob.glob(os.path.join(root, csrc, "*.cu")))
    build = os.path.join(work, "build")
    os.makedirs(build)
    print(f"{args.lib}: compiling {len(sources)} sources for sm_{arch} with MAX_JOBS={os.environ.get('MAX_JOBS')}",
          flush=True)
    t0 = time.time()
    cpp_extension.load(name=module, sources=sources, build_directory=build, verbose=True,
                       extra_cflags=["-O3"],
                       extra_cuda_cflags=NVCC + ["-gencode", f"arch=compute_{arch},code=sm_{arch}"],
                       extra_include_paths=[os.path.join(root, csrc)])
    (so,) = glob.glob(os.path.join(build, f"{module}*.so"))
    tmp = os.path.join(args.target, f".{module}.so.partial")  # appear whole: other sections may import it
    shutil.copy(so, tmp)
    os.replace(tmp, os.path.join(args.target, f"{module}.so"))
    print(f"{args.lib}: built {module} in {time.time() - t0:.0f} s -> {args.target}/{module}.so", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
