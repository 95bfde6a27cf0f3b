#!/usr/bin/env bash
# Build OpenPBS (not packaged for Debian or PyPI) from the upstream source tarball into /opt/pbs, as root,
# for the `pbs` scheduler backend's tests (tests/helpers/pbs.py starts a private single host from it).
# The build happens OUTSIDE the project tree (a scratch directory under /var/tmp) and is reused: nothing is
# rebuilt while /opt/pbs/sbin/pbs_server exists and was built from a tarball with the same SHA-256.
# Usage: deploy/openpbs.sh [TARBALL]   (default: ../shared/third_party/openpbs-*.tar.gz beside the project)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PBS_PREFIX="${PBS_PREFIX:-/opt/pbs}"
quiet() { if [ "${NAGAYA_VERBOSE:-0}" = 1 ]; then "$@"; else "$@" >/tmp/nagaya-openpbs.log 2>&1 || { tail -n 60 /tmp/nagaya-openpbs.log; return 1; }; fi; }

[ "$(id -u)" = 0 ] || { echo "openpbs.sh: run as root" >&2; exit 1; }
tarball="${1:-}"
if [ -z "$tarball" ]; then
  for t in "$here"/../shared/third_party/openpbs-*.tar.gz; do [ -f "$t" ] && tarball="$t"; done
fi
[ -n "$tarball" ] && [ -f "$tarball" ] || { echo "openpbs.sh: no OpenPBS source tarball (../shared/third_party/openpbs-*.tar.gz)" >&2; exit 1; }
sum=$(sha256sum "$tarball" | cut -d' ' -f1)
stamp="$PBS_PREFIX/.nagaya-source-sha256"

# Runtime: PBS's own PostgreSQL data service, its Tcl/Python hooks, libical/cjson. Build: the upstream
# INSTALL list for Debian, less sendmail-bin (it would replace exim4; PBS runs jobs without mailing).
RUNTIME=(postgresql postgresql-contrib expat libedit2 python3 tcl tk libical3 libcjson1 sudo)
BUILD=(gcc g++ make libtool autoconf automake perl swig libhwloc-dev libx11-dev libxt-dev libedit-dev
       libical-dev libncurses-dev postgresql-server-dev-all python3-dev tcl-dev tk-dev libexpat1-dev
       libssl-dev libxext-dev libxft-dev libcjson-dev)
missing=()
for p in "${RUNTIME[@]}" "${BUILD[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "   openpbs: apt install ${missing[*]}"
  quiet apt-get update
  DEBIAN_FRONTEND=noninteractive quiet apt-get install -y --no-install-recommends "${missing[@]}"
fi

if [ -x "$PBS_PREFIX/sbin/pbs_server" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$sum" ]; then
  echo "   openpbs: $PBS_PREFIX is built from this source already"
  exit 0
fi

build=$(mktemp -d /var/tmp/nagaya-openpbs-build.XXXXXX)
trap 'rm -rf "$build"' EXIT
tar -xzf "$tarball" -C "$build" --strip-components=1
cd "$build"
# A clean PATH keeps a pyenv/conda python out of configure (it must link Debian's libpython3).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
echo "   openpbs: building $(basename "$tarball") into $PBS_PREFIX (a few minutes)"
quiet ./autogen.sh
quiet ./configure --prefix="$PBS_PREFIX" --with-python=/usr
quiet make -j"$(nproc)"
quiet make install
chmod 4755 "$PBS_PREFIX/sbin/pbs_iff" "$PBS_PREFIX/sbin/pbs_rcp"
echo "$sum" > "$stamp"
echo "   openpbs: installed $PBS_PREFIX"
