#!/usr/bin/env bash
# Set up nagaya on a Debian 12 machine, as root: system packages, the Python package in its own
# virtual environment (/opt/nagaya), the site directories, and a first container as a smoke test.
# Idempotent: run it again after pulling new code.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${NAGAYA_PREFIX:-/opt/nagaya}"
quiet() { if [ "${NAGAYA_VERBOSE:-0}" = 1 ]; then "$@"; else "$@" >/tmp/nagaya-install.log 2>&1 || { cat /tmp/nagaya-install.log; return 1; }; fi; }

[ "$(id -u)" = 0 ] || { echo "install.sh: run as root (sudo bash deploy/install.sh)" >&2; exit 1; }

echo "== system packages"
PKGS=(
  python3 python3-venv python3-dev gcc            # the Python package and its venv
  libc6-dev                                       # the compiled starter (src/starter): `nagaya run` without Python
  libfuse3-dev libsquashfs-dev                    # nagaya-squashfs (src/sqfs): the images' multi-threaded FUSE server
  bubblewrap runc squashfs-tools squashfs-tools-ng squashfuse fuse3 uidmap   # the runtime
  busybox-static debootstrap                      # tiny base images made locally (no public registry)
  skopeo umoci podman buildah                     # peers for tests and benchmarks, OCI tooling
  tmux hyperfine procps psmisc iproute2 util-linux
  wrk                                             # bench/portal: the HTTP load generator (C: it leaves the CPU to the server)
  charliecloud-runtime
  docker-registry postgresql                      # the site registry; PostgreSQL for sites (and its tests)
  slapd ldap-utils                                # LDAP login back end tests (a private slapd)
  slurmctld slurmd slurm-client munge             # the slurm scheduler backend and its tests (a private cluster)
  slurmdbd mariadb-server                         # Slurm accounting in the tests: `job show` after slurmctld forgets a job
  slurmrestd slurm-wlm-jwt-plugin acl             # the portal submits as each user through slurmrestd + JWT
  gridengine-master gridengine-exec gridengine-client   # the gridengine backend and its tests (a private cell)
  chromium                                        # portal end-to-end tests (Playwright drives Debian's build)
  git                                             # builds from a git URL: the build job clones as the user
)
missing=()
for p in "${PKGS[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  # Grid Engine's only debconf questions: configure a cell `default` whose master is this host (the tests
  # start their own daemons; SGE_ROOT is fixed at /var/lib/gridengine).
  printf '%s\n' "gridengine-common shared/gridengineconfig boolean true" \
    "gridengine-common shared/gridenginecell string default" \
    "gridengine-common shared/gridenginemaster string $(hostname)" | debconf-set-selections
  quiet apt-get update
  DEBIAN_FRONTEND=noninteractive quiet apt-get install -y --no-install-recommends "${missing[@]}"
fi

echo "== OpenPBS (the pbs backend's tests: built once into /opt/pbs from ../shared/third_party, outside this tree)"
if compgen -G "$here/../shared/third_party/openpbs-*.tar.gz" >/dev/null; then
  bash "$here/deploy/openpbs.sh"
else
  echo "   no OpenPBS source tarball beside the project: skipped (the pbs backend's tests need /opt/pbs)"
fi

echo "== python package -> $PREFIX"
if [ ! -x "$PREFIX/bin/python3" ]; then
  /usr/bin/python3 -m venv "$PREFIX"
fi
quiet "$PREFIX/bin/pip" install --upgrade --disable-pip-version-check "$here[test]"
# The command starts Python isolated (-I: no PYTHON* variables, no user site) and without site (-S):
# both cost start-up time on every `nagaya run`, and -I keeps a user's environment out of the launcher.
purelib=$("$PREFIX/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cat > "$PREFIX/bin/nagaya-py.new" <<LAUNCHER
#!$PREFIX/bin/python3 -IS
import sys
sys.path.append("$purelib")
from nagaya.cli.entry import main
main()
LAUNCHER
chmod 0755 "$PREFIX/bin/nagaya-py.new"
mv -f "$PREFIX/bin/nagaya-py.new" "$PREFIX/bin/nagaya-py"
# /usr/local/bin/nagaya: the compiled starter (src/starter), which replays a plain `nagaya run|exec IMAGE CMD`
# from the plan the Python launcher wrote and execs `python3 -IS nagaya-py` for everything else. Never setuid.
# Without a C compiler the Python launcher is the command itself (a CI run treats that as an error).
if cc -O2 -Wall -Wno-format-truncation -DNAGAYA_PYTHON="\"$PREFIX/bin/python3\"" \
     -DNAGAYA_PYLAUNCHER="\"$PREFIX/bin/nagaya-py\"" -o /usr/local/bin/nagaya.new "$here/src/starter/nagaya-starter.c"; then
  chmod 0755 /usr/local/bin/nagaya.new
else
  [ "${CI:-}" = true ] && { echo "install.sh: the starter does not compile (CI=true: an error)" >&2; exit 1; }
  echo "   no working C compiler: /usr/local/bin/nagaya is the Python launcher (slower start-up)"
  cp "$PREFIX/bin/nagaya-py" /usr/local/bin/nagaya.new
fi
mv -f /usr/local/bin/nagaya.new /usr/local/bin/nagaya
# nagaya-squashfs (src/sqfs): serves the images to containers, in parallel and cached by the kernel. The config's
# runtime.squashfuse defaults to it when it is installed, else to squashfuse_ll (one request at a time).
mkdir -p /usr/local/libexec/nagaya
if cc -O2 -Wall -Wextra -I/usr/include/fuse3 -o /usr/local/libexec/nagaya/nagaya-squashfs.new \
     "$here/src/sqfs/nagaya-squashfs.c" -lfuse3 -lsquashfs -lpthread; then
  chmod 0755 /usr/local/libexec/nagaya/nagaya-squashfs.new
  mv -f /usr/local/libexec/nagaya/nagaya-squashfs.new /usr/local/libexec/nagaya/nagaya-squashfs
else
  rm -f /usr/local/libexec/nagaya/nagaya-squashfs.new
  [ "${CI:-}" = true ] && { echo "install.sh: nagaya-squashfs does not compile (CI=true: an error)" >&2; exit 1; }
  echo "   nagaya-squashfs does not compile: images are served by squashfuse_ll"
fi
# nagaya-keeper (src/starter): keeps a user's images mounted between runs on a node (runtime/keeper.py),
# started as the user by their first run. Without it every run mounts its image afresh.
if cc -O2 -Wall -Wextra -o /usr/local/libexec/nagaya/nagaya-keeper.new "$here/src/starter/nagaya-keeper.c"; then
  chmod 0755 /usr/local/libexec/nagaya/nagaya-keeper.new
  mv -f /usr/local/libexec/nagaya/nagaya-keeper.new /usr/local/libexec/nagaya/nagaya-keeper
else
  rm -f /usr/local/libexec/nagaya/nagaya-keeper.new
  [ "${CI:-}" = true ] && { echo "install.sh: nagaya-keeper does not compile (CI=true: an error)" >&2; exit 1; }
  echo "   nagaya-keeper does not compile: each run mounts its image afresh"
fi
chmod -R a+rX "$PREFIX"

echo "== service account"
# The site server never runs as root: `nagaya site up` (as root) runs it and the registry as `nagaya`.
# pam_unix checks other users' passwords only for root or the `shadow` group (DESIGN.md).
if ! id nagaya >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/nagaya/site --no-create-home --shell /usr/sbin/nologin nagaya
fi
usermod -a -G shadow nagaya
getent group nagaya-admins >/dev/null || groupadd --system nagaya-admins
# Passwords through the site's usual auth stack, without login(1)'s session modules.
[ -f /etc/pam.d/nagaya ] || printf '@include common-auth\n@include common-account\n' > /etc/pam.d/nagaya
# PostgreSQL's own cluster is not started here: sites point server.database at theirs; tests start a private one.
# Debian's registry unit serves :5000 with no auth at all; nagaya starts its own, with token auth.
systemctl disable --now docker-registry >/dev/null 2>&1 || true

echo "== site directories"
install -d -m 0755 /etc/nagaya /var/lib/nagaya /var/lib/nagaya/mnt
[ -f /etc/nagaya/nagaya.toml ] || install -m 0644 "$here/deploy/nagaya.toml" /etc/nagaya/nagaya.toml

if [ "$(stat -c %a /dev/fuse 2>/dev/null)" != 666 ]; then
  echo "   note: /dev/fuse is not 0666 here; unprivileged users will run images from unpacked copies" \
       "(tests set it to 0666)."
fi

echo "== first container"
demo=$(mktemp -d)
trap 'rm -rf "$demo"' EXIT
bash "$here/deploy/make-busybox-rootfs.sh" "$demo/rootfs" >/dev/null
nagaya image import "$demo/rootfs" --name busybox:latest >/dev/null
nagaya run busybox echo "nagaya works: hello from a container (busybox)"
