#!/usr/bin/env bash
# Makes sure the system libraries that lerobot/MuJoCo load at run time are present:
# EGL + Mesa for headless Meta-World rendering, FFmpeg's shared libraries for torchcodec video decoding.
set -u
pkgs=(libegl1 libgl1-mesa-dri libosmesa6 ffmpeg)
command -v dpkg >/dev/null 2>&1 || exit 0   # not Debian-like: nothing we can check, the Python side reports what is missing
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing system libraries: ${missing[*]}"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}") >/dev/null \
    || echo "warning: could not install ${missing[*]}; Meta-World rendering or video decoding may be unavailable." >&2
else
  echo "warning: missing system libraries ${missing[*]}; run 'sudo apt-get install ${missing[*]}' for Meta-World rendering and video decoding." >&2
fi
exit 0
