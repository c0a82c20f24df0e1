#!/usr/bin/env bash
# Build llama.cpp and the extension with ASan + UBSan into a separate venv and
# run tests under them.
#
#   scripts/sanitize.sh [pytest args...]     (default: the fast native tests)
#
# The Python interpreter is not instrumented, so the ASan runtime is
# preloaded; CPython's own allocations are not leaks we can act on, so leak
# detection is off (ASan still reports use-after-free, overflows, double
# frees; UBSan aborts on undefined behaviour). Build: build/sanitize (kept,
# so a second run is incremental). Prints the time taken.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
venv=build/sanitize-venv
if [ ! -x "$venv/bin/python" ] || grep -q "include-system-site-packages = true" "$venv/pyvenv.cfg"; then
    rm -rf "$venv"
    # an isolated venv: an editable install elsewhere must not shadow the build under test
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q numpy gguf tqdm matplotlib pytest scikit-build-core pybind11
"$venv/bin/python" -m pip install -q --no-build-isolation --no-deps \
    -Cbuild-dir=build/sanitize \
    -Ccmake.define.LLAMA_STEER_SANITIZE=address,undefined \
    -Ccmake.build-type=RelWithDebInfo \
    .
asan=$(${CC:-gcc} -print-file-name=libasan.so)
ubsan=$(${CC:-gcc} -print-file-name=libubsan.so)
args=("$@")
if [ ${#args[@]} -eq 0 ]; then
    args=(tests/test_steering.py tests/test_actadd.py tests/test_conditions.py tests/test_vectors.py
          tests/test_errors.py tests/test_threads.py tests/test_lifetime.py tests/test_batch.py)
fi
# paths are given from the project root; pytest runs from build/
for i in "${!args[@]}"; do
    if [ -e "${args[$i]}" ]; then args[$i]="../${args[$i]}"; fi
done
# Run from a directory where the source tree's package is not importable, so
# the sanitized build in the venv is the one under test.
cd build
export LD_PRELOAD="$asan $ubsan"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:print_summary=1:strict_init_order=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
status=0
"../$venv/bin/python" -c "
import llama_steer, sys
print('under test:', llama_steer.__file__)
sys.exit(0 if 'sanitize-venv' in llama_steer.__file__ else 'the sanitized build is not the one imported')"
"../$venv/bin/python" -m pytest -q -p no:cacheprovider --rootdir=.. "${args[@]}" || status=$?
echo "sanitize.sh: exit $status in $(( $(date +%s) - start )) s"
exit $status
