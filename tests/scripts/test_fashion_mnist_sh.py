"""scripts/fashion-mnist.sh (run by scripts/setup.sh): installs Debian's dataset-fashion-mnist when it can, says
exactly what to run when it cannot, and does nothing once the files are there. Run against fake id/apt-get/sudo."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "fashion-mnist.sh"
FILES = [f"{s}-{k}-ubyte.gz" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]
BASH = shutil.which("bash")

FAKE_APT_GET = f"""#!{BASH}
echo "apt-get $*" >> "$LOG"
case "$1" in
  update) : > "$STATE/updated" ;;
  install)
    if [ -n "${{NEEDS_UPDATE:-}}" ] && [ ! -f "$STATE/updated" ]; then exit 100; fi
    for f in {' '.join(FILES)}; do : > "$SNELLA_FASHION_MNIST_DIR/$f"; done ;;
esac
"""
FAKE_SUDO = f"""#!{BASH}
echo "sudo $*" >> "$LOG"
[ "$1" = -n ] && shift
"$@"
"""


def run_script(tmp_path: Path, uid: int, sudo: bool = False, needs_update: bool = False, apt: bool = True):
    """Run the script with only the fakes on PATH; returns (process, the commands the fakes saw, files present)."""
    bin_dir, data, state = tmp_path / "bin", tmp_path / "fmnist", tmp_path / "state"
    for d in (bin_dir, data, state):
        d.mkdir(exist_ok=True)
    fakes = {"id": f"#!{BASH}\necho {uid}\n"}
    if apt:
        fakes["apt-get"] = FAKE_APT_GET
    if sudo:
        fakes["sudo"] = FAKE_SUDO
    for name, text in fakes.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "log"
    env = {"PATH": str(bin_dir), "SNELLA_FASHION_MNIST_DIR": str(data), "LOG": str(log), "STATE": str(state)}
    if needs_update:
        env["NEEDS_UPDATE"] = "1"
    done = subprocess.run([BASH, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    calls = log.read_text().splitlines() if log.exists() else []
    return done, calls, sorted(p.name for p in data.iterdir())


def test_as_root_it_installs_the_package_without_updating_first(tmp_path):
    done, calls, present = run_script(tmp_path, uid=0)
    assert done.returncode == 0 and calls == ["apt-get install -y -q dataset-fashion-mnist"]
    assert present == sorted(FILES) and "installing it: apt-get install -y dataset-fashion-mnist" in done.stdout


def test_apt_get_update_runs_only_when_the_first_install_fails(tmp_path):
    done, calls, present = run_script(tmp_path, uid=0, needs_update=True)
    assert calls == ["apt-get install -y -q dataset-fashion-mnist", "apt-get update -q",
                     "apt-get install -y -q dataset-fashion-mnist"]
    assert done.returncode == 0 and present == sorted(FILES) and "WARNING" not in done.stderr


def test_a_user_with_passwordless_sudo_installs_through_it(tmp_path):
    done, calls, present = run_script(tmp_path, uid=1000, sudo=True)
    assert calls == ["sudo -n true", "sudo -n apt-get install -y -q dataset-fashion-mnist",
                     "apt-get install -y -q dataset-fashion-mnist"]
    assert present == sorted(FILES)


@pytest.mark.parametrize("apt", [True, False], ids=["no-sudo", "no-apt-get"])
def test_without_root_or_sudo_it_prints_the_command_and_lets_setup_go_on(tmp_path, apt):
    done, calls, present = run_script(tmp_path, uid=1000, apt=apt)
    assert done.returncode == 0 and calls == [] and present == []
    assert "    sudo apt-get install -y dataset-fashion-mnist\n" in done.stderr
    assert "snella bench accuracy" in done.stderr and "SNELLA_FASHION_MNIST_DIR" in done.stderr


def test_once_installed_it_only_checks_the_files(tmp_path):
    run_script(tmp_path, uid=0)
    (tmp_path / "log").unlink()
    done, calls, _ = run_script(tmp_path, uid=0)
    assert done.returncode == 0 and calls == [] and done.stdout == done.stderr == ""


def test_setup_checks_fashion_mnist_before_its_stamp_can_end_it_early():
    text = (REPO / "scripts" / "setup.sh").read_text()
    assert 0 <= text.index("bash scripts/fashion-mnist.sh") < text.index("exit 0")
    assert subprocess.run([BASH, "-n", str(REPO / "scripts" / "setup.sh")]).returncode == 0
