#!/usr/bin/env bash
# The subjects the retrain workflow retrains, as a JSON list for a job matrix:
#   changed-subjects.sh dispatch [NAME]   NAME, or every subject when NAME is empty
#   changed-subjects.sh push BEFORE       every subject with a file changed in BEFORE..HEAD,
#                                         the whole push however many commits it holds
# A subject is a folder subjects/<name>/ with a run.yaml; a removed one, or a name outside
# [A-Za-z0-9._-], is skipped with a warning on stderr. Needs the full history (fetch-depth: 0).
set -euo pipefail
mode=${1:?usage: changed-subjects.sh dispatch [NAME] | push BEFORE}
arg=${2:-}
case $mode in
  dispatch)
    if [ -n "$arg" ]; then names=$arg; else names=$(ls subjects 2>/dev/null || true); fi ;;
  push)
    if [[ $arg =~ ^0+$ ]]; then
      base=$(git hash-object -t tree /dev/null)  # a new branch: everything on it is new
    elif git cat-file -e "$arg^{commit}" 2>/dev/null; then
      base=$arg
    else
      echo "::warning::push base $arg is not in the history (a force push?): diffing against HEAD~1" >&2
      base=HEAD~1
    fi
    names=$(git diff --name-only "$base" HEAD -- subjects/ | cut -d/ -f2 | sort -u) ;;
  *)
    echo "unknown mode $mode; use dispatch or push" >&2
    exit 2 ;;
esac
printf '['
sep=''
for name in $names; do
  if [[ ! $name =~ ^[A-Za-z0-9._-]+$ ]]; then
    echo "::warning::skipping subjects/$name: a subject folder name uses only A-Z a-z 0-9 . _ -" >&2
  elif [ ! -f "subjects/$name/run.yaml" ]; then
    echo "skipping subjects/$name (removed, or no run.yaml)" >&2
  else
    printf '%s"%s"' "$sep" "$name"
    sep=','
  fi
done
printf ']\n'
