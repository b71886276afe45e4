#!/usr/bin/env bash
# One command from a fresh Debian machine to a result:
#   bash bootstrap.sh compare [compare options]   # loop-ext4 vs quotafs, the main job
#   bash bootstrap.sh test [pytest options]       # the whole test suite
# It installs the system packages (as root; otherwise it prints the command to run),
# makes a virtualenv in .venv, installs quotafs with its test extras, then runs.
set -euo pipefail
cd "$(dirname "$0")"

PACKAGES=(fuse3 libfuse3-dev pkg-config e2fsprogs util-linux gcc python3-dev python3-venv git)
VENV=${QUOTAFS_VENV:-.venv}
PYTHON=${PYTHON:-python3}

missing_packages() {
    local pkg
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || echo "$pkg"
    done
}

install_system_packages() {
    command -v dpkg-query >/dev/null || return 0   # not Debian: trust the machine
    local missing
    missing=$(missing_packages | tr '\n' ' ')
    [ -z "$missing" ] && return 0
    if [ "$(id -u)" -eq 0 ]; then
        echo "bootstrap: installing $missing" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    else
        echo "bootstrap: missing system packages; run:" >&2
        echo "  sudo apt-get update && sudo apt-get install -y $missing" >&2
        exit 1
    fi
}

make_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"
    fi
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$VENV/bin/python" -m pip install -q -e '.[test,lint]'
}

command=${1:-}
shift || true
case "$command" in
    compare)
        install_system_packages
        make_venv
        exec "$VENV/bin/quotafs" compare "$@"
        ;;
    test)
        install_system_packages
        make_venv
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    *)
        echo "usage: bash bootstrap.sh {compare|test} [options]" >&2
        exit 2
        ;;
esac
