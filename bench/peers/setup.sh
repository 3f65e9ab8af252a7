#!/usr/bin/env bash
# Install the peer tools of bench/run (each on its own, so one failure skips only that peer).
# Every install is constrained by bench/peers/constraints.txt: the CPU torch==2.13.0 stays, nothing pulls a CUDA build.
here="$(cd "$(dirname "$0")" && pwd)"
for pkg in "nncf==3.4.0" "torchao==0.18.0" "torch-pruning==1.6.1"; do
  if pip install --quiet -c "$here/constraints.txt" "$pkg"; then
    echo "peer install ok: $pkg"
  else
    echo "peer install FAILED: $pkg (its bench entries will be skipped)"
  fi
done
