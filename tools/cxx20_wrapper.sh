#!/usr/bin/env bash
# torch >= 2.10 headers need C++20 but mmcv 2.1.0's setup.py forces -std=c++17: rewrite the flag.
args=()
for a in "$@"; do
  case "$a" in
    -std=c++17|-std=c++14) args+=("-std=c++20") ;;
    *) args+=("$a") ;;
  esac
done
exec "${RAT_REAL_CXX:-g++}" "${args[@]}"
