# images/local/lib.sh: what the local build scripts share. Source it after setting `prog`.
#
#   log/die/step   messages on stderr, prefixed with the script's name (step: with seconds since start)
#   debian_mirror  the Debian archive to fetch from: IMGBUILD_DEBIAN_MIRROR, else the host's, else
#                  deb.debian.org
#   fetch_pinned DIR POOL-PATH SHA256
#                  the archive's POOL-PATH in DIR, fetched unless already there with that sha256,
#                  retried (the archive's mirrors answer 5xx now and then), refused on any other hash

log() { printf '%s: %s\n' "$prog" "$*" >&2; }
die() {
  printf '%s: error: %s\n' "$prog" "$*" >&2
  exit 1
}
t0=$SECONDS
step() { log "$(printf '[%4ds] ' $((SECONDS - t0)))$*"; }

debian_mirror() {
  local m=${IMGBUILD_DEBIAN_MIRROR:-}
  if [ -z "$m" ]; then
    m=$(awk '/^URIs:/ && $2 ~ /\/debian\/?$/ { print $2; exit }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  fi
  echo "${m:-http://deb.debian.org/debian}"
}

fetch_pinned() {
  local dir=$1 path=$2 sha=$3 mirror attempt got
  local f=$dir/${path##*/}
  if [ -f "$f" ] && echo "$sha  $f" | sha256sum -c --status; then return 0; fi
  mirror=$(debian_mirror)
  mkdir -p "$dir"
  step "fetch ${path##*/}"
  for attempt in 1 2 3; do
    if curl -fsS --retry 2 -o "$f.part" "${mirror%/}/$path"; then break; fi
    [ "$attempt" = 3 ] && die "cannot fetch ${mirror%/}/$path (is the Debian archive reachable? IMGBUILD_DEBIAN_MIRROR overrides it)"
    log "fetch of ${path##*/} failed (attempt $attempt of 3); retrying in $((attempt * 5)) s"
    sleep $((attempt * 5))
  done
  got=$(sha256sum "$f.part" | cut -d' ' -f1)
  [ "$got" = "$sha" ] || {
    rm -f "$f.part"
    die "${path##*/}: sha256 $got, pinned $sha (the archive changed: update the pin in $0)"
  }
  mv "$f.part" "$f"
}
