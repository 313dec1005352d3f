#!/usr/bin/env bash
# Builds docker/Dockerfile.local (the runtime stage, FROM scratch) with podman from binaries built
# here, then runs the image's binaries in a chroot of the image as uid 65532: `--version`, `peer-id`
# and `check-config` of both, which proves the image carries every library they load.
# Binaries: $RELAYGATE_BIN_DIR, else the newer of target/release and target/debug (debug info is stripped).
# Prints SKIPPED and exits 0 when podman is missing or cannot build here.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v podman >/dev/null 2>&1; then
  echo "check-image: SKIPPED (podman not installed; apt-get install podman)"
  exit 0
fi

bin_dir="${RELAYGATE_BIN_DIR:-}"
if [[ -z "$bin_dir" ]]; then
  for d in target/release target/debug; do  # both built: the newer
    [[ -x "$d/relaygate-gateway" && -x "$d/relaygate-agent" ]] || continue
    if [[ -z "$bin_dir" || "$d/relaygate-gateway" -nt "$bin_dir/relaygate-gateway" ]]; then bin_dir=$d; fi
  done
fi
if [[ -z "$bin_dir" || ! -x "$bin_dir/relaygate-gateway" || ! -x "$bin_dir/relaygate-agent" ]]; then
  echo "check-image: FAILED: no relaygate-gateway and relaygate-agent binaries (set RELAYGATE_BIN_DIR or build them)" >&2
  exit 1
fi

ctx=target/image-local
rm -rf "$ctx"
mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/etc" "$ctx/data"
cp docker/Dockerfile.local "$ctx/Dockerfile"
for b in relaygate-gateway relaygate-agent; do
  strip --strip-debug -o "$ctx/rootfs/usr/local/bin/$b" "$bin_dir/$b" 2>/dev/null ||
    cp "$bin_dir/$b" "$ctx/rootfs/usr/local/bin/$b"
  # Every library the dynamic linker resolves, at the same path (plus the linker itself).
  ldd "$bin_dir/$b" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | while read -r lib; do
    mkdir -p "$ctx/rootfs$(dirname "$lib")"
    cp -L "$lib" "$ctx/rootfs$lib"
  done
done
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/data:/sbin/nologin\n' >"$ctx/rootfs/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$ctx/rootfs/etc/group"

tag=localhost/relaygate-check:local
if ! out=$(podman build --quiet -t "$tag" "$ctx" 2>&1); then
  echo "$out" | tail -5
  echo "check-image: SKIPPED (podman cannot build here)"
  exit 0
fi
cleanup() {
  podman image unmount "$tag" >/dev/null 2>&1 || true
  podman rmi -f "$tag" >/dev/null 2>&1 || true
}
trap cleanup EXIT

# Image metadata as the Dockerfile states it.
user=$(podman image inspect "$tag" --format '{{.Config.User}}')
entry=$(podman image inspect "$tag" --format '{{json .Config.Entrypoint}}')
[[ "$user" == "65532:65532" ]] || { echo "check-image: FAILED: image user is '$user', want 65532:65532" >&2; exit 1; }
[[ "$entry" == '["/usr/local/bin/relaygate-gateway"]' ]] || { echo "check-image: FAILED: entrypoint $entry" >&2; exit 1; }

# Containers cannot run here (podman run fails on cgroups); a chroot of the image's filesystem can.
if ! root=$(podman image mount "$tag" 2>/dev/null) || [[ "$(id -u)" != 0 ]]; then
  echo "check-image: built $tag (user $user, entrypoint $entry); run check SKIPPED (needs root and podman image mount)"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"; cleanup' EXIT
# The image is read-only once mounted: run the binaries from a copy that has a writable /data and /tmp.
cp -a "$root/." "$tmp/"
mkdir -p "$tmp/tmp" && chmod 1777 "$tmp/tmp"
chroot_bin=$(command -v chroot)
run() { env -i RELAYGATE_DATA_DIR=/data "$chroot_bin" --userspec=65532:65532 "$tmp" "$@"; }
run /usr/local/bin/relaygate-gateway --version
run /usr/local/bin/relaygate-agent --version
gw_id=$(run /usr/local/bin/relaygate-gateway peer-id)
run /usr/local/bin/relaygate-gateway check-config >/dev/null
run /usr/local/bin/relaygate-agent --data-dir /tmp/agent peer-id >/dev/null
run /usr/local/bin/relaygate-agent check-config --gateway "/dns4/gateway/tcp/4001/p2p/$gw_id" \
  --tunnel node=node:9905 >/dev/null
[[ -f "$tmp/data/identity.key" ]] || { echo "check-image: FAILED: gateway did not write /data/identity.key" >&2; exit 1; }
echo "check-image: OK: $tag from $bin_dir builds FROM scratch, runs as 65532 (gateway peer id $gw_id)"
