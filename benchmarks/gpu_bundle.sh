#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what benchmarks/gpu_check.sh needs on a GPU machine without network
# whose Python 3.12 has torch, triton, transformers, safetensors, tokenizers, numpy, einops, but no
# DeepSpeed, mamba-ssm, causal-conv1d or flash-linear-attention. Run here (CPU, PyPI reachable):
#
#     bash benchmarks/gpu_bundle.sh          # then carry .whl with the checkout (~15 MiB)
#
#   .whl/*.whl     pure-Python wheels (DeepSpeed's built here without ops), plus the compiled cp312 wheels of DeepSpeed's dependencies
#                  that may be missing there (pydantic-core, psutil, msgpack); versions from
#                  constraints.txt
#   .whl/sdist/    causal-conv1d and mamba-ssm sources: gpu_check.sh compiles their CUDA extensions
#                  on the GPU for that device only (benchmarks/gpu_build_ext.py)
#   .whl/data/     token shards of this repository's text (megaxatl prepare-data, a 1000-piece
#                  SentencePiece vocabulary, 2048-token context) for the training section
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
BIN=$(dirname "$PY")
DEST=.whl
pin() { grep -i -E "^$1==" constraints.txt | head -1 | cut -d= -f3; }  # exact version from constraints.txt
CAUSAL_CONV1D=1.7.0       # newest in pyproject's cuda extra (>=1.4,<1.8)
MAMBA_SSM=2.3.2.post1     # newest in pyproject's cuda extra (>=2.2,<2.4)
rm -rf "$DEST" && mkdir -p "$DEST/sdist"
pure=(fla-core hjson pydantic annotated-types typing-inspection typing_extensions py-cpuinfo)
compiled=(pydantic_core psutil msgpack)
specs=()
for name in "${pure[@]}" "${compiled[@]}"; do
    v=$(pin "$name"); [ -n "$v" ] || { echo "gpu_bundle: $name is not pinned in constraints.txt" >&2; exit 1; }
    specs+=("$name==$v")
done
# only wheels (no build here), for CPython 3.12 on x86-64 Linux; pure ones match `any`
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$DEST" "${specs[@]}"
# DeepSpeed publishes only an sdist: build its wheel here with no ops compiled (py3-none-any; the
# trainer's default optimizer is torch's AdamW, DeepSpeed's ops stay unused)
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "deepspeed==$(pin deepspeed)"
# the sources only (their setup.py needs nvcc to build; metadata is read with the CUDA build off)
CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE "$PY" -m pip download -q --no-deps \
    --no-binary=:all: --no-build-isolation -d "$DEST/sdist" "causal-conv1d==$CAUSAL_CONV1D" "mamba-ssm==$MAMBA_SSM"
# training data: this repository's text, printable ASCII, one document per file
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
mkdir -p "$work/text"
git ls-files '*.py' '*.md' | while read -r f; do
    [ -s "$f" ] && LC_ALL=C tr -cd '\11\12\40-\176' < "$f" > "$work/text/$(echo "$f" | tr '/' '_').txt"
done
find "$work/text" -empty -delete
"$BIN/megaxatl" prepare-data "$work/text" --train-spm 1000 --seq-len 2048 --val-docs 4 --out "$DEST/data" > /dev/null
ls -la "$DEST" "$DEST/sdist"
du -sh "$DEST"
