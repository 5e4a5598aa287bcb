#!/usr/bin/env bash
# The Python peers the tests talk to: the official `openai` client and a Prometheus text parser
# (against our HTTP API), and llama-cpp-python's OpenAI-compatible server (a real remote
# majordomo). Idempotent: the venv lives in the user's cache, and pip's wheel cache keeps
# llama.cpp's build (several minutes on 2 cores the first time) for the next run.
#
# Usage: deploy/python-env.sh            prints the venv's python on stdout
# The tests use TEST_PEERS_PYTHON when set (.ci/run exports it), else they run this script.
set -euo pipefail
venv="${MM_PYENV:-${XDG_CACHE_HOME:-$HOME/.cache}/mm/pyenv}"
want=("openai>=1" "prometheus-client>=0.20" "llama-cpp-python[server]==0.3.36")
stamp="$venv/.mm-installed"
mkdir -p "$(dirname "$venv")"
# Tests may call this at once: one installs, the others wait for it.
exec 9>"$venv.lock"
flock 9
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "${want[*]}" ]]; then
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check "${want[@]}" >&2
    echo "${want[*]}" >"$stamp"
fi
echo "$venv/bin/python"
