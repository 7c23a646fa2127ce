#!/usr/bin/env bash
# Installs what the tests and the local stack need and this machine lacks:
# moto, checkov and schemathesis (PyPI), cloud-init, shellcheck, openssl and wrk (Debian). PostgreSQL's binaries come with the machine.
set -euo pipefail

# shellcheck source=scripts/tools.env
. "$(dirname "$0")/tools.env"

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
command -v cloud-init >/dev/null 2>&1 || missing+=(cloud-init)
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
# The api tests make an identity provider's keys with it.
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
# hive-bench's HTTP load generator for the reads scenario.
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  missing+=(postgresql)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing from Debian: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! python3 -c 'import moto.server, flask, flask_cors' >/dev/null 2>&1; then
  echo "installing moto ${MOTO_VERSION} from PyPI"
  python3 -m pip install --quiet --disable-pip-version-check "moto[server]==${MOTO_VERSION}"
fi

if [ ! -x "${CHECKOV_VENV}/bin/checkov" ]; then
  echo "installing checkov ${CHECKOV_VERSION} from PyPI into ${CHECKOV_VENV}"
  python3 -m venv "${CHECKOV_VENV}"
  "${CHECKOV_VENV}/bin/python" -m pip install --quiet --disable-pip-version-check "checkov==${CHECKOV_VERSION}"
fi

if [ ! -x "${SCHEMATHESIS_VENV}/bin/schemathesis" ] || [ ! -x "${SCHEMATHESIS_VENV}/bin/openapi-spec-validator" ]; then
  echo "installing schemathesis ${SCHEMATHESIS_VERSION} and openapi-spec-validator ${OPENAPI_SPEC_VALIDATOR_VERSION} from PyPI into ${SCHEMATHESIS_VENV}"
  python3 -m venv "${SCHEMATHESIS_VENV}"
  "${SCHEMATHESIS_VENV}/bin/python" -m pip install --quiet --disable-pip-version-check \
    "schemathesis==${SCHEMATHESIS_VERSION}" "openapi-spec-validator==${OPENAPI_SPEC_VALIDATOR_VERSION}"
fi
