#!/usr/bin/env bash
# The main command: set up the environment if needed, then run tools/demo.py (camera, node and
# recorder over real DDS). Without arguments: the default model on 8 new synthetic scenes;
# annotated images go to demo_out/ and the detections are printed as a table.
# Arguments go to tools/demo.py, e.g. tools/demo.sh --video clip.mp4 --overwrite
#                                    tools/demo.sh --model /models/qwen3-vl-4b-nf4 --images DIR
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/tools/setup_env.sh"
exec "${QVP_VENV:-$repo/.venv}/bin/python" "$repo/tools/demo.py" "$@"
