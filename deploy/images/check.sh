#!/usr/bin/env bash
# Checks the images deploy/images/build.sh made, without a container runtime (this project's
# build machines have a crun that cannot start containers: hybrid cgroups): each image's root
# filesystem is mounted (`podman image mount`) and its programs run in it — chrooted, as the
# image's user, in a private mount namespace with /proc, /dev and a /tmp of their own:
#   - every image: its user and entrypoint, `pond --version`, `git --version`, CA certificates;
#   - the agents image: `codex --version`, `claude --version`.
# (Runs need more than a chroot: a chrooted process may not make the user namespace that hides
# pond's keys from a stage. bins/tests/deploy.rs runs the images with podman.)
# Root only. Usage: bash deploy/images/check.sh  (POND_IMAGE_TAG as for build.sh)
set -euo pipefail
TAG="${POND_IMAGE_TAG:-dev}"
fail() { echo "check failed: $*" >&2; exit 1; }

inside() { # rootfs, command...
  local root="$1"; shift
  unshare --mount --fork sh -c '
    root="$1"; shift
    mount --bind /proc "$root/proc" && mount --rbind /dev "$root/dev" && mount -t tmpfs tmpfs "$root/tmp"
    exec chroot --userspec=10001:10001 "$root" /usr/bin/env -i HOME=/var/lib/pond \
      PATH=/opt/pond-agents/node_modules/.bin:/usr/local/bin:/usr/bin:/bin "$@"
  ' sh "$root" "$@"
}

for image in pond-server pond-worker pond-worker-agents; do
  ref="localhost/$image:$TAG"
  user=$(podman image inspect --format '{{.Config.User}}' "$ref")
  entry=$(podman image inspect --format '{{join .Config.Entrypoint " "}}' "$ref")
  [ "$user" = "10001:10001" ] || fail "$ref runs as '$user', not 10001:10001"
  [ "$entry" = "/usr/bin/tini -- /usr/local/bin/pond" ] || fail "$ref entrypoint '$entry'"
  root=$(podman image mount "$ref")
  trap 'podman image unmount "$ref" >/dev/null 2>&1 || true' EXIT
  echo "$ref ($(podman image inspect --format '{{.Size}}' "$ref" | numfmt --to=iec)): user $user"
  inside "$root" pond --version
  inside "$root" git --version
  [ -s "$root/etc/ssl/certs/ca-certificates.crt" ] || fail "$ref has no CA certificates"
  if [ "$image" = pond-worker-agents ]; then
    inside "$root" codex --version
    inside "$root" claude --version
  fi
  podman image unmount "$ref" >/dev/null
  trap - EXIT
done
echo "images check: ok"
