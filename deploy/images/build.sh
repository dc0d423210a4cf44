#!/usr/bin/env bash
# Builds Pond's container images on a machine that reaches no container registry: each base is a
# minimal Debian made by mmdebstrap from Debian packages and imported into podman; the images'
# Containerfiles only COPY onto it (no RUN step: nothing runs inside a container at build time).
#
#   bash deploy/images/build.sh            # localhost/pond-server, pond-worker, pond-worker-agents :dev
#   bash deploy/images/build.sh --bases    # only the Debian bases (what .ci/run prepares)
#   POND_IMAGE_TAG=1.2.3 bash deploy/images/build.sh
#
# The bases (localhost/pond-base:<suite>, localhost/pond-agents-base:<suite>) are made once and
# reused; POND_IMAGE_REBUILD_BASES=1 makes them again (e.g. for Debian's security updates).
# POND_IMAGE_BIN_DIR takes `pond` and `pond-sandbox-helper` from a directory instead of
# `cargo build --release` (the tests use their own build).
#
# Needs root (mmdebstrap), podman and mmdebstrap (installed from Debian when missing), cargo,
# and npm for the agents image (the pinned codex and claude CLIs, the versions .ci/run tests).
set -euo pipefail
cd "$(dirname "$0")/../.."
TAG="${POND_IMAGE_TAG:-dev}"
SUITE="${POND_DEBIAN_SUITE:-bookworm}"
OUT="${POND_IMAGE_BUILD:-target/images}"
CODEX_VERSION=0.169.0
CLAUDE_VERSION=2.1.330

need=()
command -v podman >/dev/null 2>&1 || need+=(podman)
command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
command -v npm >/dev/null 2>&1 || need+=(npm)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -q && apt-get install -y -q "${need[@]}"
fi
mkdir -p "$OUT"

# The bases: Debian minbase with CA certificates, git (git_https sources) and tini (PID 1 that
# forwards signals and reaps), a `pond` user (uid 10001) whose home is the data directory, and no
# apt lists, docs or man pages. The agents' base adds Debian's Node.js for the agent CLIs.
base() { # name, extra packages
  local ref="localhost/pond-$1:$SUITE"
  if [ -z "${POND_IMAGE_REBUILD_BASES:-}" ] && podman image exists "$ref"; then
    return
  fi
  local tar="$OUT/$1.tar"
  mmdebstrap --quiet --variant=minbase --include="ca-certificates,git,tini${2:+,$2}" \
    --customize-hook='chroot "$1" useradd --system --uid 10001 --user-group --home-dir /var/lib/pond --create-home --shell /usr/sbin/nologin pond' \
    --customize-hook='chmod 0700 "$1/var/lib/pond"' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/usr/share/doc/* "$1"/usr/share/man/* "$1"/usr/share/locale/*' \
    "$SUITE" "$tar"
  podman import --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin' "$tar" "$ref" >/dev/null
  rm -f "$tar"
}
base base ""
base agents-base "nodejs"

# The agent CLIs, pinned, installed here (npm) once per version pair.
AGENTS="$OUT/agents-$CODEX_VERSION-$CLAUDE_VERSION"
if [ ! -x "$AGENTS/node_modules/.bin/codex" ] || [ ! -e "$AGENTS/node_modules/.bin/claude" ]; then
  rm -rf "$AGENTS" && mkdir -p "$AGENTS"
  (cd "$AGENTS" && npm install --silent --no-audit --no-fund --omit=dev \
    "@openai/codex@$CODEX_VERSION" "@anthropic-ai/claude-code@$CLAUDE_VERSION")
  # npm hard-links claude's 380 MB binary into two places; a COPY would store it twice. Every
  # further link of a file becomes a symlink to its first.
  find "$AGENTS/node_modules" -type f -links +1 -printf '%i %p\n' | sort -k1,1 -k2 | \
    while read -r inode path; do
      if [ "$inode" = "${seen:-}" ]; then ln -sfr "$first" "$path"; else seen=$inode; first=$path; fi
    done
fi
[ "${1:-}" = "--bases" ] && exit 0

if [ -n "${POND_IMAGE_BIN_DIR:-}" ]; then
  BIN="$POND_IMAGE_BIN_DIR"
else
  cargo build --release --bin pond --bin pond-sandbox-helper
  BIN=target/release
fi
# Two build contexts: the binaries, and the binaries with the agent CLIs (hard links, no copy).
CONTEXT="$OUT/context-$TAG"
rm -rf "$CONTEXT" "$CONTEXT-agents" && mkdir -p "$CONTEXT" "$CONTEXT-agents/agents"
cp "$BIN/pond" "$BIN/pond-sandbox-helper" "$CONTEXT/"
cp -al "$CONTEXT/pond" "$CONTEXT/pond-sandbox-helper" "$CONTEXT-agents/"
cp -al "$AGENTS/node_modules" "$CONTEXT-agents/agents/"

build() { # image, containerfile, base, context
  podman build --quiet --build-arg "BASE=localhost/pond-$3:$SUITE" -f "deploy/images/$2" -t "localhost/$1:$TAG" \
    "$4" >/dev/null
  printf '%-32s %s\n' "localhost/$1:$TAG" "$(podman image inspect --format '{{.Size}}' "localhost/$1:$TAG" | numfmt --to=iec)"
}
build pond-server Containerfile.server base "$CONTEXT"
build pond-worker Containerfile.worker base "$CONTEXT"
build pond-worker-agents Containerfile.worker-agents agents-base "$CONTEXT-agents"
rm -rf "$CONTEXT" "$CONTEXT-agents"
