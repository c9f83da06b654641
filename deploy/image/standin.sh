#!/usr/bin/env bash
# Build the two base images the Dockerfile names, locally, for machines that reach no image registry:
#
#   python:3.11-slim-bookworm  Debian bookworm (mmdebstrap --variant=apt) with Debian's Python 3.11, the
#                              same minor version as the official image, and `python3 -m venv /usr/local`
#                              on top: a /usr/local/bin/python with its own removable pip, as the official
#                              image has (the Dockerfile's cpu stage uninstalls it)
#   busybox:1.37.0             Debian's busybox-static (1.35) with a link per applet, for the bundle image
#
# They are stand-ins: the images tests/test_image.py builds from them run the project's code the way the
# real bases would, but their sizes and package lists are Debian's, not the official images'. Where a
# registry is reachable, pull the real images instead (this script leaves an image it did not make alone).
#
#   bash deploy/image/standin.sh    # idempotent: returns at once when both stand-ins of this recipe exist
#
# Needs root, podman, mmdebstrap and busybox-static (`make image-base` installs them) and the Debian
# mirror of the machine's apt sources (about 2.5 minutes and 45 MB of packages, once per machine: podman's
# image store keeps the result).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$ROOT/deploy/image/containers.conf}"
PYTHON_IMAGE="docker.io/library/python:3.11-slim-bookworm"
BUSYBOX_IMAGE="docker.io/library/busybox:1.37.0"
# The recipe's identity: this script. An image labelled with another hash is rebuilt.
RECIPE="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"
LABEL="org.rewardserve.standin"

log() { printf 'deploy/image/standin.sh: %s\n' "$*" >&2; }

# up_to_date IMAGE: 0 = our stand-in of this recipe; 1 = absent or ours of an older recipe; exits 0
# when IMAGE exists but is not ours (a pulled official image: keep it).
up_to_date() {
    podman image exists "$1" || return 1
    local label
    label="$(podman image inspect --format "{{index .Labels \"$LABEL\"}}" "$1")"
    if [ -z "$label" ] || [ "$label" = "<no value>" ]; then
        log "$1 exists and is not a stand-in (pulled from a registry?): left as it is"
        return 0
    fi
    [ "$label" = "$RECIPE" ]
}

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

if up_to_date "$PYTHON_IMAGE"; then
    log "$PYTHON_IMAGE: up to date"
else
    log "building the stand-in $PYTHON_IMAGE with mmdebstrap (Debian bookworm, python3.11)"
    mmdebstrap --quiet --variant=apt \
        --include=python3,python3-venv,python-is-python3,ca-certificates \
        --aptopt='APT::Install-Recommends "false"' \
        --customize-hook='chroot "$1" python3 -m venv /usr/local' \
        --customize-hook='chroot "$1" /usr/local/bin/python -m pip --version' \
        bookworm "$WORK/python.tar"
    podman import --quiet \
        --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change "LABEL $LABEL=$RECIPE" \
        --change 'CMD ["python3"]' \
        "$WORK/python.tar" "$PYTHON_IMAGE" >/dev/null
    rm -f "$WORK/python.tar"
fi

if up_to_date "$BUSYBOX_IMAGE"; then
    log "$BUSYBOX_IMAGE: up to date"
else
    log "building the stand-in $BUSYBOX_IMAGE from /bin/busybox (busybox-static)"
    file_type="$(LC_ALL=C /bin/busybox 2>&1 | head -n1 || true)"
    case "$file_type" in BusyBox*) ;; *) log "ERROR: /bin/busybox is not BusyBox (install busybox-static)"; exit 1 ;; esac
    mkdir -p "$WORK/busybox/bin" "$WORK/busybox/tmp"
    cp /bin/busybox "$WORK/busybox/bin/busybox"
    for applet in $(/bin/busybox --list); do
        [ "$applet" = busybox ] || ln -s busybox "$WORK/busybox/bin/$applet"
    done
    chmod 1777 "$WORK/busybox/tmp"
    tar -C "$WORK/busybox" --numeric-owner --owner=0 --group=0 -cf "$WORK/busybox.tar" .
    podman import --quiet \
        --change 'ENV PATH=/bin' \
        --change "LABEL $LABEL=$RECIPE" \
        --change 'CMD ["sh"]' \
        "$WORK/busybox.tar" "$BUSYBOX_IMAGE" >/dev/null
fi
