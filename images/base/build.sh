#!/usr/bin/env bash
# A stand-in for python:3.11-slim-bookworm built from Debian packages, for builders that cannot
# pull from a container registry (air-gapped, or a CI machine that reaches only Debian and PyPI):
# debootstrap'ed bookworm with Debian's Python 3.11, pip and venv, and the host's CA bundle (so
# a TLS-inspecting proxy the host trusts is trusted in the build too). Then:
#   docker build -f images/Dockerfile --build-arg BASE_IMAGE=proxytune-base:bookworm ...
# Usage: images/base/build.sh [TAG]   (default proxytune-base:bookworm; root, debootstrap, docker)
set -euo pipefail
tag=${1:-proxytune-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
echo "debootstrap bookworm from $mirror into $root"
debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
  bookworm "$root" "$mirror" >"$root.log" 2>&1 || { tail -20 "$root.log"; exit 1; }
rm -f "$root.log"
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
# As in the python image: `python` and `pip` on PATH, and pip may install into the system
# Python (Debian marks it externally managed; the image is the only thing using it).
rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
ln -sf python3 "$root/usr/bin/python"
ln -sf pip3 "$root/usr/bin/pip"
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
tar -C "$root" --numeric-owner -c . |
  docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$tag" >/dev/null
echo "built $tag ($(docker image inspect -f '{{.Size}}' "$tag" | numfmt --to=iec))"
