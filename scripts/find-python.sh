#!/usr/bin/env bash
# Prints the path of a Python 3.12 interpreter, or explains in one sentence how to get one.
# lerobot 0.6.1 needs Python >= 3.12 and our pins need < 3.13, so nothing else will do.
set -u
is312() { "$1" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 12) else 1)' >/dev/null 2>&1; }

for c in "${PYTHON:-}" python3.12 python3 python; do
  [ -n "$c" ] || continue
  p=$(command -v "$c" 2>/dev/null) || continue
  if is312 "$p"; then echo "$p"; exit 0; fi
done
# pyenv keeps non-global versions out of PATH; ask it directly.
if command -v pyenv >/dev/null 2>&1; then
  root=$(pyenv root)
  for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.|$)' | sort -rV); do
    p="$root/versions/$v/bin/python3.12"
    if is312 "$p"; then echo "$p"; exit 0; fi
  done
fi
if command -v uv >/dev/null 2>&1; then
  p=$(uv python find 3.12 2>/dev/null) && is312 "$p" && { echo "$p"; exit 0; }
fi
echo "cl_vla needs Python 3.12 (lerobot 0.6.1 requires it): install it (e.g. 'apt-get install python3.12-venv', 'pyenv install 3.12', or 'uv python install 3.12') or point PYTHON=/path/to/python3.12 at one." >&2
exit 1
