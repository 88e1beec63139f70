#!/usr/bin/env bash
# Make sure Fashion-MNIST is installed (Debian package dataset-fashion-mnist, 31 MB): `snella bench accuracy`
# (its structured tasks) and `snella pretrain` read it. Called by scripts/setup.sh on every run, so it must
# stay fast once the files are there: then it only tests that the four files exist.
# Installs the package with apt-get as root, or through sudo when that needs no password; `apt-get update`
# only if the first install fails. Otherwise it prints the command to run, and exits 0 all the same:
# the default `snella finetune` needs no Fashion-MNIST.
# Uses shell builtins and id, apt-get, sudo only (the tests run it against fakes of those three).
set -uo pipefail
export DEBIAN_FRONTEND=noninteractive
pkg=dataset-fashion-mnist
dir=${SNELLA_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}

have_files() {
  local f
  for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
    [ -f "$dir/$f" ] || return 1
  done
}

have_files && exit 0

if command -v apt-get >/dev/null 2>&1; then
  as_root=()
  can_install=1
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
      as_root=(sudo -n)
    else
      can_install=0
    fi
  fi
  if [ "$can_install" = 1 ]; then
    echo "setup: Fashion-MNIST is missing from $dir; installing it: ${as_root[*]:+${as_root[*]} }apt-get install -y $pkg"
    install() { "${as_root[@]}" apt-get install -y -q "$pkg"; }
    install >/dev/null 2>&1 || { "${as_root[@]}" apt-get update -q >/dev/null 2>&1; install >/dev/null 2>&1; }
    have_files && exit 0
  fi
fi

{
  echo "setup: WARNING: Fashion-MNIST is not installed ($dir lacks its files), and this script could not install it."
  echo "  \`snella bench accuracy\` and \`snella pretrain\` need it, and in CI its tests fail without it. Run:"
  echo "    sudo apt-get install -y $pkg"
  echo "  (as root: apt-get install -y $pkg; if apt-get cannot find it: apt-get update first), or set"
  echo "  SNELLA_FASHION_MNIST_DIR to a folder holding {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz."
} >&2
exit 0
