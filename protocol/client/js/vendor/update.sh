#!/usr/bin/env bash
# Re-vendor @msgpack/msgpack as one ES module (msgpack.mjs) with its LICENSE.
#
# Browsers load Herald's client without a build step, so the codec is checked
# in as the package's own published ESM build, bundled into a single file by
# esbuild (no code of ours in it). Bump the pinned version here, run this
# script (needs npm and the registry), run the tests, commit the result.
set -euo pipefail

MSGPACK_VERSION=3.1.3
ESBUILD_VERSION=0.28.2

here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

npm pack --silent "@msgpack/msgpack@${MSGPACK_VERSION}" >/dev/null
tar xzf "msgpack-msgpack-${MSGPACK_VERSION}.tgz"
npm exec --yes --package "esbuild@${ESBUILD_VERSION}" -- esbuild package/dist.esm/index.mjs \
  --bundle --format=esm --target=es2020 --legal-comments=inline \
  --banner:js="// @msgpack/msgpack ${MSGPACK_VERSION} (ISC), bundled by protocol/client/js/vendor/update.sh; do not edit." \
  --outfile="$here/msgpack.mjs" --log-level=warning
cp package/LICENSE "$here/msgpack.LICENSE"
echo "vendored @msgpack/msgpack ${MSGPACK_VERSION} into $here/msgpack.mjs"
