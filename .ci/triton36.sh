#!/usr/bin/env bash
# CI, second pass: the Triton test files under triton 3.6.0 (the GPU machine's version), in a fresh
# venv of its own (.venv36). triton 3.6.0's interpreter holds every scalar as a one-element 1-d
# numpy array and converts it with int()/float() (loop bounds, program ids, scalar arguments);
# numpy >= 2.4 made that conversion a TypeError ("only 0-dimensional arrays can be converted to
# Python scalars"), so this venv pins numpy < 2.4. triton 3.7 fixed its interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
rm -rf .venv36
python3 -m venv .venv36
. .venv36/bin/activate
pip install -q torch==2.13.0 triton==3.6.0 "numpy<2.4" pytest pytest-xdist hypothesis
# the package from the source tree (no C++ build needed for the Triton tests)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -m pytest -q -p no:cacheprovider -n 2 python_tests/test_triton.py python_tests/test_triton_aot.py \
    python_tests/test_sparse.py -k "triton or aot"
echo "triton 3.6.0 pass finished in $(( $(date +%s) - start )) s"
