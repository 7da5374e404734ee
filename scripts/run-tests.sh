#!/usr/bin/env bash
# Run the whole test suite from a fresh clone: installs what the tests need, then runs pytest under a
# virtual display (the GUI tests drive a real napari viewer). Extra arguments go to pytest.
#   - as root, installs Xvfb and the Qt/xcb system libraries with apt-get (skipped when present);
#   - creates .venv (unless it exists) and installs the package with its test extras;
#   - keeps the tests' embedding cache in a temporary folder, never the user's.
set -euo pipefail
cd "$(dirname "$0")/.."

SYSTEM_PACKAGES="xvfb xauth libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0
  libxcb-xinerama0 libxcb-xkb1 libxkbcommon-x11-0 libxcb-cursor0 libxcb-shape0 libxcb-xfixes0 libdbus-1-3
  libfontconfig1 libgl1 libegl1"

missing_system_packages() {
  for package in $SYSTEM_PACKAGES; do
    dpkg -s "$package" >/dev/null 2>&1 || echo "$package"
  done
}

if command -v dpkg >/dev/null && [ -n "$(missing_system_packages)" ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "== installing Xvfb and Qt system libraries"
    apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $SYSTEM_PACKAGES >/dev/null
  else
    echo "missing system packages (install them as root): $(missing_system_packages | tr '\n' ' ')" >&2
  fi
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PYTHON" -m venv .venv
fi
echo "== installing napari-sam-ft with its test extras"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"

NAPARI_SAM_FT_CACHE="$(mktemp -d)"
export NAPARI_SAM_FT_CACHE
trap 'rm -rf "$NAPARI_SAM_FT_CACHE"' EXIT

echo "== running the tests"
set +e
# --durations: the slowest tests are named in every run, to keep the whole run inside CI's 30 minutes.
xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/python -m pytest -p no:cacheprovider --durations=15 "$@"
status=$?
set -e
if [ "$status" = 5 ]; then
  # pytest's 5 means it collected no test (e.g. a -k filter that matches nothing): not a failure of the code.
  echo "pytest collected no tests (exit code 5): nothing ran; check the arguments given to scripts/run-tests.sh" >&2
  status=0
fi
exit "$status"
