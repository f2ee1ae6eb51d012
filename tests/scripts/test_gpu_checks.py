"""scripts/gpu_checks.sh without a GPU: it parses, names only files that exist and options its scripts take, and
refuses an unknown part before it starts anything."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.scripts import SCRIPTS

REPO = SCRIPTS.parent
TEXT = (SCRIPTS / "gpu_checks.sh").read_text()


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPTS / "gpu_checks.sh")], check=True)


def test_every_script_and_test_file_it_names_exists():
    named = set(re.findall(r"\b((?:scripts|tests)/[\w/]+(?:\.py|\.sh)?)", TEXT))
    assert "scripts/bench_step.py" in named and "tests/memoria/test_kernels.py" in named
    missing = sorted(path for path in named if not (REPO / path).exists())
    assert not missing, f"gpu_checks.sh names files that do not exist: {missing}"


def commands_of(script: str) -> list[str]:
    """Each call of scripts/<script>.py in gpu_checks.sh, continuation lines joined, with the variants its
    here-document feeds to the call."""
    joined = TEXT.replace("\\\n", " ")
    calls = [line for line in joined.splitlines() if f"scripts/{script}.py" in line]
    variants = re.search(r"<<'VARIANTS'\n(.*?)\nVARIANTS", TEXT, re.S)
    if script == "bench_memoria" and variants:
        calls += variants.group(1).splitlines()
    return calls


def test_every_option_it_passes_is_one_the_script_takes():
    for script in ("bench_memoria", "bench_step"):
        calls = commands_of(script)
        assert calls, script
        used = {option for call in calls for option in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", call)}
        helptext = subprocess.run([sys.executable, str(SCRIPTS / f"{script}.py"), "--help"], capture_output=True,
                                  text=True, check=True, cwd=REPO).stdout
        unknown = sorted(option for option in used if not re.search(rf"{re.escape(option)}\b", helptext))
        assert not unknown, f"gpu_checks.sh passes {script}.py options it does not take: {unknown}"


def test_an_unknown_part_is_refused_before_anything_runs(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(SCRIPTS / "gpu_checks.sh")], cwd=REPO, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PARTS": "tests walk", "OUT": str(out), "PYTHON": "false"},
                          timeout=60)
    assert done.returncode == 2
    assert "no part 'walk'" in done.stderr and "tests memoria step sort" in done.stderr
    assert not (out / "gpu_checks.log").exists()  # nothing set up or run
