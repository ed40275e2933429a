#!/usr/bin/env bash
# Create (or refresh) the project's virtualenv: ROS 2 from PyPI wheels when no distro is
# sourced, the project's vision_msgs built from tools/ros2_env/vision_msgs and its
# qwen_vl_perception_interfaces from interfaces/, the ML stack and the test tools. Idempotent: a second run with nothing changed returns in about a second.
#
#   tools/setup_env.sh            # venv at ./.venv (override with QVP_VENV=/path)
#   QVP_FORCE=1 tools/setup_env.sh  # rebuild everything that is stamped
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${QVP_VENV:-$repo/.venv}
env_dir=$repo/tools/env
msgs_src=$repo/tools/ros2_env/vision_msgs
interfaces_src=$repo/interfaces/qwen_vl_perception_interfaces
base_python=${QVP_PYTHON:-python3}

log() { printf '[setup_env] %s\n' "$*" >&2; }

# Everything that decides the venv's content enters the stamp.
stamp_value=$(cat "$env_dir"/requirements*.txt "$msgs_src"/CMakeLists.txt "$msgs_src"/package.xml \
  "$msgs_src"/msg/*.msg "$interfaces_src"/CMakeLists.txt "$interfaces_src"/package.xml \
  "$interfaces_src"/action/*.action "${BASH_SOURCE[0]}" "$repo/setup.py" \
  | sha256sum | cut -d' ' -f1)
stamp_file=$venv/.qvp-setup-stamp

if [[ -z ${QVP_FORCE:-} && -f $stamp_file && $(cat "$stamp_file") == "$stamp_value" ]] \
   && "$venv/bin/python" -c 'import rclpy, vision_msgs.msg, torch, transformers
import qwen_vl_perception_interfaces.action' 2>/dev/null; then
  log "up to date: $venv"
  exit 0
fi

# A sourced ROS 2 distro that already has rclpy and vision_msgs is used as is; so is a torch
# the base interpreter already has (a CUDA build, say): the venv then sees system packages.
use_distro=0
if [[ -n ${ROS_DISTRO:-} ]] && "$base_python" -c 'import rclpy, vision_msgs.msg' 2>/dev/null; then
  use_distro=1
fi
system_site=()
if [[ $use_distro == 1 ]] || "$base_python" -c 'import torch' 2>/dev/null; then
  system_site=(--system-site-packages)
fi

if [[ ! -x $venv/bin/python ]]; then
  log "creating $venv ${system_site[*]}"
  "$base_python" -m venv "${system_site[@]}" "$venv"
fi
py=$venv/bin/python
# Older bundled pips (Python 3.10's 23.0) install the package editable through the legacy
# 'setup.py develop', which the ament_python setup.cfg breaks.
"$py" -m pip install --disable-pip-version-check -q --upgrade 'pip>=24' 2>&1 \
  | { grep -v "^WARNING: Location 'file:" >&2 || true; }
pip_install() {
  # pip's own status decides; the filter only hides this machine's noise about local indexes.
  "$py" -m pip install --disable-pip-version-check -q "$@" 2>&1 \
    | { grep -v "^WARNING: Location 'file:" >&2 || true; }
  return "${PIPESTATUS[0]}"
}

if [[ $use_distro == 1 ]]; then
  log "using the sourced ROS 2 $ROS_DISTRO (rclpy, vision_msgs)"
else
  log "installing ROS 2 Kilted wheels"
  pip_install -r "$env_dir/requirements-ros.txt"
  "$py" -c 'import rclpy' || { log "rclpy did not install"; exit 1; }
fi

# torch (and its triton) only when the venv has none, so that a CUDA build is never
# replaced: the other files name no torch.
requirements=(-r "$env_dir/requirements.txt" -r "$env_dir/requirements-test.txt")
if "$py" -c 'import torch' 2>/dev/null; then
  log "keeping the installed torch $("$py" -c 'import torch; print(torch.__version__)')"
else
  requirements=(-r "$env_dir/requirements-torch.txt" "${requirements[@]}")
fi
log "installing the ML stack and test tools"
pip_install "${requirements[@]}"
# (bitsandbytes' optional-kernel warning is noise here: the tools and the node hide it too)
"$py" -c 'import logging; logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(40)
import torch, transformers, bitsandbytes, peft, cv2' \
  || { log "the ML stack did not install"; exit 1; }

build_interfaces() {  # NAME SOURCE: an interface package built with CMake into the venv
  # (over a sourced distro, its CMAKE_PREFIX_PATH is searched too)
  local build=$venv/build/$1
  rm -rf "$build" && mkdir -p "$build"
  (
    cd "$build"
    PATH=$venv/bin:$PATH cmake "$2" -DCMAKE_PREFIX_PATH="$venv" \
      -DCMAKE_INSTALL_PREFIX="$venv" -DPython3_EXECUTABLE="$py" -DBUILD_TESTING=OFF \
      > cmake.log 2>&1 && PATH=$venv/bin:$PATH make -j"$(nproc)" > make.log 2>&1 \
      && make install > install.log 2>&1
  ) || { log "$1 build failed; logs in $build"; tail -n 30 "$build"/*.log >&2; exit 1; }
}

if [[ $use_distro == 0 ]]; then
  log "building vision_msgs into the venv"
  # The ROS wheels' CMake exports name the wheel builder's interpreter paths: point them here.
  "$py" - <<'EOF'
import pathlib
import re
import sys
import sysconfig

paths = sysconfig.get_paths()
# e.g. /opt/python/cp310-cp310/include/python3.10 (one per wheel build's Python)
builder = r'/opt/python/cp3\d+-cp3\d+'
replacements = [
    (re.compile(builder + r'/include/python3\.\d+'), paths['include']),
    (re.compile(builder + r'/lib/python3\.\d+/site-packages'), paths['purelib']),
]
for cmake_file in pathlib.Path(sys.prefix, 'share').rglob('*.cmake'):
    text = cmake_file.read_text(errors='surrogateescape')
    new = text
    for pattern, here in replacements:
        new = pattern.sub(lambda _match, here=here: here, new)
    if new != text:
        cmake_file.write_text(new, errors='surrogateescape')
EOF
  build_interfaces vision_msgs "$msgs_src"
  "$py" -c 'from vision_msgs.msg import Detection2DArray' \
    || { log "vision_msgs does not import"; exit 1; }
fi

# The project's own interfaces (the Detect action), with or without a distro.
log "building qwen_vl_perception_interfaces into the venv"
build_interfaces qwen_vl_perception_interfaces "$interfaces_src"
"$py" -c 'from qwen_vl_perception_interfaces.action import Detect' \
  || { log "qwen_vl_perception_interfaces does not import"; exit 1; }

# The project itself, editable, with its console scripts (perception_node, ...).
log "installing qwen_vl_perception (editable)"
pip_install --no-deps --no-build-isolation -e "$repo"

echo "$stamp_value" > "$stamp_file"
log "ready: $venv (activate with: source $venv/bin/activate)"
