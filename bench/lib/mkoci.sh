#!/usr/bin/env bash
# bench/lib/mkoci.sh ROOTFS ARCHIVE REF
#
# An oci-archive (a tar of an OCI image layout) of ROOTFS as one gzip layer, built by hand as
# runtime-lab §2 does (no registry, no skopeo: skopeo would create /var/lib/containers/cache).
# REF goes into the index's org.opencontainers.image.ref.name, which both `podman load` and
# `stagehand image load` take as the image's name. Deterministic: sorted entries, mtime 0,
# owner root, `gzip -n`. Uses gzip -1: the large image is mostly random bytes, which no level
# compresses, and building it should not take longer than loading it.
set -euo pipefail
rootfs=$1 out=$2 ref=$3
t=$(mktemp -d "${TMPDIR:-/tmp}/stagehand-bench-oci.XXXXXX")
trap 'rm -rf "$t"' EXIT
mkdir -p "$t/layout/blobs/sha256"
# Digest the uncompressed tar (the diff_id) and compress it in one pass.
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$rootfs" -cf - . |
    tee >(sha256sum | cut -d' ' -f1 >"$t/diffid") | gzip -n -1 >"$t/layer"
while [ ! -s "$t/diffid" ]; do sleep 0.05; done
diffid=$(cat "$t/diffid")
put() {
    local d
    d=$(sha256sum "$1" | cut -d' ' -f1)
    mv "$1" "$t/layout/blobs/sha256/$d"
    echo "$d $(stat -c %s "$t/layout/blobs/sha256/$d")"
}
read -r ld ls < <(put "$t/layer")
jq -cn --arg diff "sha256:$diffid" '{created: "1970-01-01T00:00:00Z", architecture: "amd64", os: "linux",
  config: {Env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], Cmd: ["/bin/sh"]},
  rootfs: {type: "layers", diff_ids: [$diff]}}' >"$t/config"
read -r cd cs < <(put "$t/config")
jq -cn --arg cd "sha256:$cd" --argjson cs "$cs" --arg ld "sha256:$ld" --argjson ls "$ls" '{schemaVersion: 2,
  mediaType: "application/vnd.oci.image.manifest.v1+json",
  config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $cd, size: $cs},
  layers: [{mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: $ld, size: $ls}]}' >"$t/manifest"
read -r md ms < <(put "$t/manifest")
echo '{"imageLayoutVersion":"1.0.0"}' >"$t/layout/oci-layout"
jq -cn --arg md "sha256:$md" --argjson ms "$ms" --arg ref "$ref" '{schemaVersion: 2,
  mediaType: "application/vnd.oci.image.index.v1+json",
  manifests: [{mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $md, size: $ms,
               annotations: {"org.opencontainers.image.ref.name": $ref}}]}' >"$t/layout/index.json"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$t/layout" -cf "$out" oci-layout index.json blobs
