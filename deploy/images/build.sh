#!/usr/bin/env bash
# Builds Pond's container images on a machine that reaches no container registry: each base is a
# minimal Debian made by mmdebstrap from Debian packages and imported into podman; the images'
# Containerfiles only COPY onto it (no RUN step: nothing runs inside a container at build time).
#
#   bash deploy/images/build.sh            # localhost/pond-server, pond-worker, pond-worker-agents :dev
#   POND_IMAGE_TAG=1.2.3 bash deploy/images/build.sh
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

cargo build --release --bin pond --bin pond-sandbox-helper
mkdir -p "$OUT/context"
cp target/release/pond target/release/pond-sandbox-helper "$OUT/context/"

# The bases: Debian minbase with CA certificates, git (git_https sources) and tini (PID 1 that
# forwards signals and reaps), a `pond` user (uid 10001) whose home is the data directory, and no
# apt lists, docs or man pages. The agents' base adds Debian's Node.js for the agent CLIs.
base() { # name, extra packages
  local tar="$OUT/$1.tar"
  mmdebstrap --variant=minbase --include="ca-certificates,git,tini${2:+,$2}" \
    --customize-hook='chroot "$1" useradd --system --uid 10001 --user-group --home-dir /var/lib/pond --create-home --shell /usr/sbin/nologin pond' \
    --customize-hook='chmod 0700 "$1/var/lib/pond"' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/usr/share/doc/* "$1"/usr/share/man/* "$1"/usr/share/locale/*' \
    "$SUITE" "$tar"
  podman import --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin' "$tar" "localhost/pond-$1:$TAG" >/dev/null
  rm -f "$tar"
}
base base ""
base agents-base "nodejs"

# The agent CLIs, pinned, installed here (npm) and copied in.
rm -rf "$OUT/context/agents" && mkdir -p "$OUT/context/agents"
(cd "$OUT/context/agents" && npm install --silent --no-audit --no-fund --omit=dev \
  "@openai/codex@$CODEX_VERSION" "@anthropic-ai/claude-code@$CLAUDE_VERSION")

build() { # image, containerfile, base
  podman build --quiet --build-arg "BASE=localhost/pond-$3:$TAG" -f "deploy/images/$2" -t "localhost/$1:$TAG" "$OUT/context" >/dev/null
  printf '%-24s %s\n' "localhost/$1:$TAG" "$(podman image inspect --format '{{.Size}}' "localhost/$1:$TAG" | numfmt --to=iec)"
}
build pond-server Containerfile.server base
build pond-worker Containerfile.worker base
build pond-worker-agents Containerfile.worker-agents agents-base
