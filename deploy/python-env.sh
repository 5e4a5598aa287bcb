#!/usr/bin/env bash
# The Python peers the tests talk to: the official `openai` client and a Prometheus text parser
# (against our HTTP API), and llama-cpp-python's OpenAI-compatible server (a real remote
# majordomo). Idempotent: the venv lives in the user's cache and is built once (llama.cpp's
# build takes several minutes on 2 cores), again only when what it should hold changes.
#
# Usage: deploy/python-env.sh            prints the venv's python on stdout
# The tests use TEST_PEERS_PYTHON when set (.ci/run exports it), else they run this script.
set -euo pipefail
venv="${MM_PYENV:-${XDG_CACHE_HOME:-$HOME/.cache}/mm/pyenv}"
want=("openai>=1" "prometheus-client>=0.20" "llama-cpp-python[server]==0.3.36")
# llama.cpp built for AVX2, not for the build machine's every feature: its native build on a
# Xeon with AMX and AVX-512 died of a general protection fault in libggml-cpu at the first
# request. AVX2 is also the instruction set our own kernels use, so comparisons stay fair.
export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
stamp="$venv/.mm-installed"
mkdir -p "$(dirname "$venv")"
# Tests may call this at once: one installs, the others wait for it.
exec 9>"$venv.lock"
flock 9
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "${want[*]} $CMAKE_ARGS" ]]; then
    python3 -m venv --clear "$venv" >&2
    # No wheel cache: a wheel built earlier with other CMAKE_ARGS would be taken as it is.
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir "${want[@]}" >&2
    echo "${want[*]} $CMAKE_ARGS" >"$stamp"
fi
echo "$venv/bin/python"
