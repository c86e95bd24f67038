#!/usr/bin/env bash
# Drift check (not CI): the suite on the NEWEST versions pyproject.toml allows, to find on purpose
# what an upstream release breaks before a user does. CI and the README install from
# constraints.txt instead, the exact set the suite last passed with.
#
#   tools/check_latest_deps.sh                      clone HEAD, fresh venv, no constraints, run the suite
#   tools/check_latest_deps.sh --write-constraints  ... and when it passes, make that set constraints.txt
#
# Prints one summary line (date, versions, result) for the README's "Testing" section. Needs the
# package registry; takes ~3 min to install plus the suite (~15 min on 2 cores).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
write=0
[ "${1:-}" = "--write-constraints" ] && write=1
work="$(mktemp -d "${TMPDIR:-/tmp}/megaxatl-drift.XXXXXX")"
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/src"
cd "$work/src"
python3 -m venv .venv
# torch==2.13.0: the local CPU wheel (a bare torch would pull a multi-GB CUDA build)
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 -e '.[dev]'
.venv/bin/pip freeze --exclude-editable --disable-pip-version-check | sed 's/^torch==\(.*\)+cpu$/torch==\1/' > "$work/freeze.txt"
versions=$(grep -iE '^(torch|transformers|deepspeed|triton|lm[-_]eval|kernels|tokenizers|megatron-core)==' "$work/freeze.txt" | tr '\n' ' ')
start=$(date +%s)
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider > "$work/pytest.log" 2>&1
rc=$?
set -e
tail -n 3 "$work/pytest.log"
result=$(tail -n 1 "$work/pytest.log" | sed 's/=//g; s/^ *//; s/ *$//')
echo "drift check $(date -u +%Y-%m-%d): ${result} in $(( ($(date +%s) - start) / 60 )) min with ${versions}"
if [ "$rc" -ne 0 ]; then
    grep -E '^(FAILED|ERROR) ' "$work/pytest.log" | head -n 20 || true
    exit "$rc"
fi
if [ "$write" = 1 ]; then
    {
        echo "# The exact versions the suite last passed with (tools/check_latest_deps.sh --write-constraints,"
        echo "# $(date -u +%Y-%m-%d), Python $(.venv/bin/python -c 'import platform; print(platform.python_version())')). The README's commands and .ci/run install with -c constraints.txt,"
        echo "# so an upstream release cannot change what CI tests; pyproject.toml keeps the ranges."
        cat "$work/freeze.txt"
    } > "$repo/constraints.txt"
    echo "wrote $repo/constraints.txt"
fi
