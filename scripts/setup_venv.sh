#!/usr/bin/env bash
# Creates .venv (when absent or out of date) with everything the demo, the tests and the benchmark need.
# torch is installed first and pinned: on this project's CI machine `torch==2.13.0` is a CPU wheel on local disk,
# while an unpinned `torch` would pull a multi-GB CUDA build. GPU users set TORCH_SPEC to the build they want.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$repo_root/.venv}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
python_bin="${PYTHON:-python3}"

stamp_file="$venv/.verl-supervisor-stamp"
wanted_stamp="$(cat "$repo_root/pyproject.toml" "$repo_root/scripts/setup_venv.sh" | sha256sum | cut -d' ' -f1) $torch_spec"

if [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$wanted_stamp" ]]; then
    exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
    echo "setup_venv: creating $venv" >&2
    "$python_bin" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check --quiet)
echo "setup_venv: installing $torch_spec, then the project with its verl, dev and bench extras (a few minutes on first run)" >&2
"${pip[@]}" install --upgrade pip
"${pip[@]}" install "$torch_spec"
"${pip[@]}" install -e "$repo_root[verl,dev,bench]"
echo "$wanted_stamp" >"$stamp_file"
