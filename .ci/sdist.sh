#!/usr/bin/env bash
# CI: the package builds and installs from its distributions, not only from a git clone.
#   1. `python -m build --sdist --wheel --no-isolation` with the calling environment's python
#      (torch installed first, as the README says; `build` is installed there if missing);
#   2. a fresh virtual environment: torch==2.13.0 (the local CPU wheel) and triton first, then
#      `pip install --no-build-isolation <sdist>` (the C++ extension compiles from the sdist's
#      own sources and headers, in pip's temporary directory);
#   3. from outside the source tree: `python -m kdkernels info` and a small `check`, after making
#      sure the kdkernels that runs is the installed one;
#   4. the wheel reinstalled over it (no compile) and `info` once more.
# About 3-4 minutes on the 2-core CI machine (two compiles of the extension). Usage, from any
# directory, in an environment with torch: bash .ci/sdist.sh   (KEEP=1 keeps the work directory)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
start=$(date +%s)
work="$(mktemp -d "${TMPDIR:-/tmp}/kdkernels-sdist.XXXXXX")"
if [ "${KEEP:-0}" != "1" ]; then trap 'rm -rf "$work"' EXIT; fi
PY="${PYTHON:-python}"
"$PY" -c "import torch" || { echo "sdist.sh: install torch first (pip install torch==2.13.0)" >&2; exit 1; }
"$PY" -m pip show build > /dev/null 2>&1 || "$PY" -m pip install -q build  # (a build/ folder imports as "build")

# Build from a clean copy of the checkout (tracked and untracked-but-not-ignored files): an old
# *.egg-info/SOURCES.txt in the working tree would otherwise carry files into the sdist.
src="$root"
if git -C "$root" rev-parse --git-dir > /dev/null 2>&1; then
  src="$work/src"
  mkdir -p "$src"
  (cd "$root" && git ls-files -z --cached --others --exclude-standard \
     | tar --null --ignore-failed-read -cf - -T - 2> /dev/null) | tar -xf - -C "$src"
fi
echo "+ python -m build --sdist --wheel --no-isolation"
(cd "$src" && "$PY" -m build --sdist --wheel --no-isolation --outdir "$work/dist" . > "$work/build.log" 2>&1) \
  || { tail -40 "$work/build.log"; exit 1; }
sdist=$(ls "$work"/dist/kdkernels-*.tar.gz)
wheel=$(ls "$work"/dist/kdkernels-*.whl)
echo "built $(basename "$sdist") and $(basename "$wheel")"

# Every tracked source and header of csrc/ must be in the sdist.
if git -C "$root" rev-parse --git-dir > /dev/null 2>&1; then
  tar tzf "$sdist" | sed 's|^[^/]*/||' > "$work/sdist-files.txt"
  missing=0
  for f in $(git -C "$root" ls-files csrc); do
    grep -qxF "$f" "$work/sdist-files.txt" || { echo "sdist lacks $f" >&2; missing=1; }
  done
  [ "$missing" = 0 ] || exit 1
fi

echo "+ fresh venv: torch==2.13.0 first, then pip install --no-build-isolation $(basename "$sdist")"
python3 -m venv "$work/venv"
vpy="$work/venv/bin/python"
"$vpy" -m pip install -q torch==2.13.0 triton==3.7.1 numpy setuptools wheel ninja
"$vpy" -m pip install -q --no-build-isolation "$sdist"

cd "$work"   # outside the source tree: only the installed package can be imported
"$vpy" - <<'PY'
import os, kdkernels
where = os.path.dirname(kdkernels.__file__)
assert "site-packages" in where, f"kdkernels imported from {where}, not from the installed sdist"
print("kdkernels", kdkernels.__version__, "from", where)
PY
echo "+ python -m kdkernels info"
"$vpy" -m kdkernels info
echo "+ python -m kdkernels check --rows 8 --vocab 100 --repeats 1"
"$vpy" -m kdkernels check --rows 8 --vocab 100 --repeats 1 | tee "$work/check.txt"
grep -q "^forward_kl *cpu " "$work/check.txt" || { echo "check ran no cpu backend: the extension did not build" >&2; exit 1; }

echo "+ pip install --no-deps --force-reinstall $(basename "$wheel"); python -m kdkernels info"
"$vpy" -m pip install -q --no-deps --force-reinstall "$wheel"
"$vpy" -m kdkernels info > /dev/null
echo "sdist/wheel install check passed in $(( $(date +%s) - start )) s"
