#!/usr/bin/env bash
# Runs the pytest suite in .venv; exit code 5 (no test collected) counts as a failure.
# Test files go under one fixed folder that pytest empties at the start of each run, and
# only failed tests keep theirs (pyproject.toml, [tool.pytest.ini_options]), so repeated runs
# cannot fill the disk.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
tmp_root="${TMPDIR:-/tmp}"
basetemp="$tmp_root/rat-plugins-pytest-$(id -u)"
# The training tests write checkpoints and feature caches: about 1 GB at the peak.
need_mb=2048
free_mb=$(df -Pm "$tmp_root" | awk 'NR==2 {print $4}')
if [ -n "$free_mb" ] && [ "$free_mb" -lt "$need_mb" ]; then
  echo "run_tests: only ${free_mb} MB free in $tmp_root; the tests need about ${need_mb} MB." >&2
  echo "run_tests: free space there (old pytest folders: rm -rf $tmp_root/pytest-of-*) or set TMPDIR to a roomier disk." >&2
  exit 1
fi
# Two pytest-xdist workers by default (RAT_TEST_WORKERS: 1 runs in one process; more on a larger
# machine): most tests wait on one single-threaded training process, so two keep both cores of a small
# machine busy. --dist loadfile keeps each file in one worker, so the SLURM tests (one file) share one
# localhost cluster; Ray tests of two workers take turns (tests/conftest.py).
workers="${RAT_TEST_WORKERS:-2}"
parallel=()
if [ "$workers" -gt 1 ] 2>/dev/null; then parallel=(-n "$workers" --dist loadfile); fi
.venv/bin/python -m pytest tests -ra --durations=20 --basetemp="$basetemp" ${parallel[@]+"${parallel[@]}"} "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
