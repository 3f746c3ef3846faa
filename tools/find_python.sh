#!/usr/bin/env sh
# Prints the path of a Python >= 3.12: first from PATH, then from pyenv's versions.
# Exits 1 with a message on stderr when there is none.
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }
for name in python3.13 python3.12 python3 python; do
  p=$(command -v "$name" 2>/dev/null) || continue
  if ok "$p"; then echo "$p"; exit 0; fi
done
root=${PYENV_ROOT:-$HOME/.pyenv}
for p in $(ls -d "$root"/versions/3.1[2-9]*/bin/python3 2>/dev/null | sort -V); do
  if ok "$p"; then echo "$p"; exit 0; fi
done
echo "error: no Python >= 3.12 found on PATH or under $root/versions; install one (e.g. 'pyenv install 3.12') or put it on PATH" >&2
exit 1
