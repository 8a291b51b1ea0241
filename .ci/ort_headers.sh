#!/usr/bin/env bash
# ONNX Runtime C/C++ headers for building deploy_ctc's custom-op library, from Debian's libonnxruntime-dev.
#
# Prints the include folder (the one holding onnxruntime_cxx_api.h) on its last line of stdout; .ci/run exports it
# as DEPLOY_CTC_ORT_INCLUDE. The headers are never copied into the repository.
#
# - Already there (/usr/include/onnxruntime, or $DEPLOY_CTC_ORT_INCLUDE): nothing to do.
# - Debian 13 (trixie) and later: `apt-get install -y libonnxruntime-dev` (the package is in the suite).
# - Debian 12 (bookworm): the package is not in the suite. apt downloads trixie's package through a private apt
#   configuration (its own sources list, lists, cache and an empty status file under ORT_HEADERS_DIR), reusing the
#   mirror the machine already has configured, and `dpkg-deb -x` unpacks it into ORT_HEADERS_DIR. The system's apt
#   configuration and installed packages are left alone. Only the headers are used: the library in the package
#   needs a newer glibc, and a custom-op library links no libonnxruntime anyway.
#
# Environment: ORT_HEADERS_DIR (default ~/.cache/deploy_ctc-ort-headers), ORT_HEADERS_SUITE (default trixie).
set -euo pipefail

have_headers() { [ -f "$1/onnxruntime_cxx_api.h" ] && [ -f "$1/onnxruntime_c_api.h" ]; }

for candidate in "${DEPLOY_CTC_ORT_INCLUDE:-}" /usr/include/onnxruntime; do
    if [ -n "$candidate" ] && have_headers "$candidate"; then
        echo "$candidate"
        exit 0
    fi
done

sudo=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then sudo="sudo"; fi

version="$(cut -d. -f1 /etc/debian_version 2>/dev/null || echo 0)"
if [ "${version}" -ge 13 ] 2>/dev/null; then
    echo "Debian $(cat /etc/debian_version): apt-get install libonnxruntime-dev" >&2
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq libonnxruntime-dev >&2
    have_headers /usr/include/onnxruntime || { echo "libonnxruntime-dev installed no headers" >&2; exit 1; }
    echo /usr/include/onnxruntime
    exit 0
fi

dir="${ORT_HEADERS_DIR:-${HOME}/.cache/deploy_ctc-ort-headers}"
suite="${ORT_HEADERS_SUITE:-trixie}"
include="$dir/root/usr/include/onnxruntime"
if have_headers "$include"; then
    echo "$include"
    exit 0
fi
echo "Debian $(cat /etc/debian_version 2>/dev/null || echo '?'): libonnxruntime-dev from $suite into $dir" >&2

# The mirror of the machine's own Debian sources (deb822 .sources or one-line .list), else deb.debian.org.
mirror="$(grep -hsE '^\s*URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n1 || true)"
if [ -z "$mirror" ]; then
    mirror="$(grep -hsE '^\s*deb\s' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        | grep -i debian | grep -v security | awk '{for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' \
        | head -n1 || true)"
fi
mirror="${mirror:-http://deb.debian.org/debian}"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg

mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial" "$dir/download" "$dir/root"
echo "deb [signed-by=$keyring] $mirror $suite main" >"$dir/sources.list"
: >"$dir/status"
apt_private=(
    -o "Dir::Etc::sourcelist=$dir/sources.list" -o "Dir::Etc::sourceparts=-"
    -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache" -o "Dir::State::status=$dir/status"
    -o "APT::Get::List-Cleanup=0"
)
apt-get "${apt_private[@]}" update -qq >&2
(cd "$dir/download" && apt-get "${apt_private[@]}" download libonnxruntime-dev >&2)
dpkg-deb -x "$(ls "$dir"/download/libonnxruntime-dev_*.deb | head -n1)" "$dir/root"
have_headers "$include" || { echo "the package held no headers under $include" >&2; exit 1; }
echo "$include"
