#!/usr/bin/env bash
# Make a tiny rootfs from Debian's busybox-static: a base image with no registry needed.
set -euo pipefail
dest="${1:?usage: make-busybox-rootfs.sh DIR}"
bb=/bin/busybox
[ -x "$bb" ] || { echo "busybox-static is not installed" >&2; exit 1; }
mkdir -p "$dest"/{bin,sbin,etc,tmp,proc,sys,dev,home,root,usr/bin,usr/sbin,var/tmp}
cp "$bb" "$dest/bin/busybox"
for applet in $("$bb" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$dest/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$dest/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$dest/etc/group"
chmod 1777 "$dest/tmp" "$dest/var/tmp"
echo "$dest"
