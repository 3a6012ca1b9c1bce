#!/usr/bin/env bash
# The Debian packages the test suite needs, installed when missing (make test runs this first):
#   postgresql       the sweep tests start their own PostgreSQL server (a study shared by workers)
#   chromium         the report tests open lmforge's HTML report in a real headless browser
#   chromium-driver  (chromedriver, through which selenium drives it)
#   g++              DeepSpeed compiles its CPU communication op when a CPU job starts (the DeepSpeed tests)
# lmforge itself needs none of them.
set -euo pipefail
missing=()
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
    missing+=(postgresql)
fi
if ! command -v chromium >/dev/null 2>&1; then
    missing+=(chromium)
fi
if ! command -v chromedriver >/dev/null 2>&1; then
    missing+=(chromium-driver)
fi
if ! command -v g++ >/dev/null 2>&1; then
    missing+=(g++)
fi
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "the tests need ${missing[*]}: install it with your package manager" >&2
    exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
echo "installing ${missing[*]} (Debian packages the tests use)"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
