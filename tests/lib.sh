# tests/lib.sh: shared by the booted tests (tests/image/run, tests/e2e/run). Source it.
#
# Every test prints `PASS what` or `FAIL what` lines on stderr and exits non-zero on the first
# failure; cleanup runs from an EXIT trap, so a failed step leaves no process, namespace or
# mount behind.

ib_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ib_root/target}
IMGBUILD=$CARGO_TARGET_DIR/release/imgbuild
FIRSTBOOT=$CARGO_TARGET_DIR/release/firstboot
# Where the booted tests keep baked images between runs (tests/run bakes once for all of them).
IB_IMAGES=${IB_IMAGES:-/var/tmp/imgbuild-test/images}
OVMF_CODE=/usr/share/OVMF/OVMF_CODE_4M.fd
OVMF_VARS=/usr/share/OVMF/OVMF_VARS_4M.fd

ib_name=${0#"$ib_root"/}
log() { printf '%s: %s\n' "$ib_name" "$*" >&2; }
pass() { printf '%s: PASS %s\n' "$ib_name" "$*" >&2; }
fail() {
  printf '%s: FAIL %s\n' "$ib_name" "$*" >&2
  exit 1
}
need() { command -v "$1" >/dev/null || fail "$1 is missing: apt-get install $2 (or run .ci/setup-host)"; }

# Cleanup actions, run in reverse order at exit.
ib_cleanups=()
on_exit() { ib_cleanups+=("$*"); }
ib_run_cleanups() {
  local i
  for ((i = ${#ib_cleanups[@]} - 1; i >= 0; i--)); do eval "${ib_cleanups[$i]}" >/dev/null 2>&1 || true; done
  ib_cleanups=()
}
trap ib_run_cleanups EXIT
trap 'exit 130' INT TERM

# Release binaries of imgbuild and firstboot (what operators run and what images carry).
# IB_BUILD=0 takes them as they are (iterating on a test).
ib_build() {
  [ "${IB_BUILD:-1}" = 0 ] && [ -x "$IMGBUILD" ] && [ -x "$FIRSTBOOT" ] && return
  log "cargo build --release (imgbuild, firstboot)"
  cargo build --release --locked --bins >&2 || fail "cargo build --release"
}

# ib_bake OUT ROLE... [-- ARGS]: bakes images/debian-12.toml for these roles into OUT.
ib_bake() {
  local out=$1
  shift
  local roles=() extra=()
  while [ $# -gt 0 ]; do
    [ "$1" = -- ] && { shift; extra=("$@"); break; }
    roles+=(--role "$1")
    shift
  done
  "$IMGBUILD" --image "$ib_root/images/debian-12.toml" "${roles[@]}" --out "$out" "${extra[@]}" >/dev/null
}

# ib_bake_inputs: a digest of what a bake of images/debian-12.toml depends on: definition, lock,
# firstboot, the files that go into images, and the bake's code.
ib_bake_inputs() {
  (
    cd "$ib_root"
    find images/debian-12.toml images/debian-12.lock manifests/image manifests/templates/boot.ipxe \
      manifests/templates/ova.ovf builder/src/image builder/src/pxe.rs -type f -print0 | sort -z | xargs -0 sha256sum
    sha256sum "$FIRSTBOOT"
  ) | sha256sum | cut -c1-64
}

# ib_images: IB_IMAGES holds master and worker images of the current bake inputs (baked now
# unless they are there already).
ib_images() {
  local want have
  want=$(ib_bake_inputs)
  have=$(cat "$IB_IMAGES/.inputs" 2>/dev/null || true)
  if [ "$want" = "$have" ] && [ -f "$IB_IMAGES/master/disk.raw" ] && [ -f "$IB_IMAGES/worker/disk.raw" ]; then
    log "images in $IB_IMAGES are current"
    return
  fi
  log "baking master and worker images into $IB_IMAGES"
  mkdir -p "$IB_IMAGES"
  rm -f "$IB_IMAGES/.inputs"
  ib_bake "$IB_IMAGES" master worker || fail "imgbuild --role master --role worker"
  echo "$want" >"$IB_IMAGES/.inputs"
}

# ib_wait_for SECONDS WHAT CMD...: polls CMD every 2 s until it succeeds.
ib_wait_for() {
  local secs=$1 what=$2 start=$SECONDS
  shift 2
  until "$@" >/dev/null 2>&1; do
    [ $((SECONDS - start)) -lt "$secs" ] || return 1
    sleep 2
  done
  log "$what after $((SECONDS - start)) s"
}

# ib_grep_log SECONDS FILE PATTERN: waits until FILE has a line matching PATTERN (grep -E).
ib_grep_log() {
  local secs=$1 file=$2 pattern=$3 start=$SECONDS
  until grep -aqE -- "$pattern" "$file" 2>/dev/null; do
    [ $((SECONDS - start)) -lt "$secs" ] || return 1
    sleep 1
  done
}

# ib_free_port: a free TCP port on 127.0.0.1.
ib_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# ib_uefi_vars FILE: a writable copy of OVMF's variable store.
ib_uefi_vars() { cp "$OVMF_VARS" "$1"; }
