#!/usr/bin/env bash
# bench/lib/mkrootfs.sh DIR
#
# The busybox root filesystem every container of the bench runs: the host's static busybox
# (Debian's busybox-static, /bin/busybox) with a symlink per applet, /etc/passwd and
# /etc/group with root and nobody, a sticky /tmp and /var/www/index.html for the httpd
# services. About 2 MB. The same tree is imported into stagehand's store, packed into the
# oci-archive podman loads, and shared read-only by the raw runc bundles.
set -euo pipefail
dir=$1
busybox=/bin/busybox
case "$(LC_ALL=C ldd "$busybox" 2>&1 || true)" in
*"not a dynamic executable"*) ;;
*)
    echo "mkrootfs: $busybox is missing or not static (apt-get install -y busybox-static)" >&2
    exit 1
    ;;
esac
rm -rf "$dir"
mkdir -p "$dir"/{bin,sbin,usr/bin,usr/sbin,etc,root,tmp,var/www,proc,sys,dev}
cp "$busybox" "$dir/bin/busybox"
chmod 1777 "$dir/tmp"
for applet in $("$dir/bin/busybox" --list-full); do
    [ "$applet" = bin/busybox ] && continue
    mkdir -p "$dir/$(dirname "$applet")"
    ln -sf /bin/busybox "$dir/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$dir/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$dir/etc/group"
echo '<h1>hello from the stagehand bench</h1>' >"$dir/var/www/index.html"
