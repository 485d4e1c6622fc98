"""tools/check_lock.py's logic (markers evaluated for the target, the dependency closure, pip's errors read back) and
tools/find_python.sh, on fixtures: nothing here reaches the network (`make check-lock` is the real check, in CI)."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import check_lock as cl  # noqa: E402
from check_lock import Requirement  # noqa: E402  (packaging's, or pip's copy)

# The Requires-Dist of mlx 0.32.4's wheels, as published.
MLX = ['mlx-metal==0.32.4; platform_system == "Darwin"', 'numpy>=2; extra == "dev"',
       'mlx-cuda-12==0.32.4; platform_system == "Linux" and extra == "cuda"',
       'mlx-cpu==0.32.4; platform_system == "Linux" and extra == "cpu"']
METADATA = {
    "mlx": MLX, "mlx-metal": [], "mlx-cpu": [], "tomli": [], "numpy": [], "iniconfig": [],
    "pytest": ['iniconfig>=1', 'tomli>=1; python_version < "3.11"', 'colorama; sys_platform == "win32"'],
    "mlx-lm": ["mlx>=0.29", "numpy"],
    "mlx-lm-lora": ["mlx-lm>=0.30", "wandb", "datasets"],  # installed with --no-deps: none of these is followed
}
PYPROJECT = """[project]
name = "x"
dependencies = ["mlx; sys_platform == 'darwin'", "mlx[cpu]; sys_platform == 'linux'", "mlx-lm>=0.20"]
[project.optional-dependencies]
test = ["pytest"]
cuda = ["mlx[cuda]"]
"""


def needed(target, python, tmp, nodeps=("mlx-lm-lora",)):
    f = tmp / "pyproject.toml"
    f.write_text(PYPROJECT)
    return cl.closure(cl.project_roots(f), list(nodeps), METADATA.get, cl.marker_env(target, python))


def test_markers_are_the_targets_not_this_machines():
    try:
        from packaging.markers import default_environment
    except ImportError:
        from pip._vendor.packaging.markers import default_environment
    mac, arm = cl.marker_env("macos-arm64", "3.12"), cl.marker_env("linux-aarch64", "3.11")
    assert set(default_environment()) <= set(mac)  # every variable given: nothing falls back to this machine's
    assert (mac["sys_platform"], mac["platform_system"], mac["platform_machine"]) == ("darwin", "Darwin", "arm64")
    assert (arm["sys_platform"], arm["platform_machine"], arm["python_version"]) == ("linux", "aarch64", "3.11")
    metal, cpu = Requirement(MLX[0]), Requirement(MLX[3])
    assert cl.applies(metal, mac) and not cl.applies(metal, arm)
    assert not cl.applies(cpu, arm) and cl.applies(cpu, arm, {"cpu"}) and not cl.applies(cpu, mac, {"cpu"})
    assert not cl.applies(Requirement(MLX[1]), mac, {"cpu"})
    assert cl.applies(Requirement('tomli; python_version < "3.11"'), cl.marker_env("macos-arm64", "3.10"))
    assert not cl.applies(Requirement('tomli; python_version < "3.11"'), mac)


def test_closure_follows_markers_extras_and_no_deps(tmp_path):
    mac = needed("macos-arm64", "3.12", tmp=tmp_path)
    assert set(mac) == {"mlx", "mlx-metal", "mlx-lm", "numpy", "pytest", "iniconfig", "mlx-lm-lora"}
    linux = needed("linux-aarch64", "3.12", tmp=tmp_path)
    assert set(linux) == {"mlx", "mlx-cpu", "mlx-lm", "numpy", "pytest", "iniconfig", "mlx-lm-lora"}
    assert linux["mlx"][0] == {"cpu"}  # mlx[cpu] from the project, plain mlx from mlx-lm: the extra is kept
    assert ("mlx", "==0.32.4") in linux["mlx-cpu"][1]
    assert "tomli" in needed("linux-x86_64", "3.10", tmp=tmp_path)


def test_an_extra_asked_later_brings_its_dependencies():
    env = cl.marker_env("linux-x86_64", "3.12")
    # plain mlx is reached first (the roots are taken from the end), mlx[cpu] afterwards
    got = cl.closure([Requirement("mlx[cpu]"), Requirement("mlx")], [], METADATA.get, env)
    assert "mlx-cpu" in got and got["mlx"][0] == {"cpu"}


def fake_resolver(no_wheel=(), calls=None):
    """resolve() as pip would answer it, from METADATA, with no wheel for the names in `no_wheel`."""
    def resolve(reqs, target, python):
        if calls is not None:
            calls.append(sorted(reqs))
        picked, failed = {}, {}
        for r in map(Requirement, reqs):
            name = cl.canonicalize_name(r.name)
            if name in no_wheel:
                failed[name] = "no wheel for this platform and Python"
            else:
                picked[name] = (str(r.specifier).lstrip("="), METADATA.get(name, []), f"{name}.whl")
        return picked, failed
    return resolve


def write_lock(tmp_path, pins):
    lock = tmp_path / "requirements.lock"
    lock.write_text("# header\n" + "".join(f"{n}=={v}\n" for n, v in pins.items()))
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    return lock


PINS = {"iniconfig": "2.3.1", "mlx": "0.32.4", "mlx-cpu": "0.32.4", "mlx-lm": "0.32.2", "mlx-lm-lora": "5.10.2",
        "numpy": "2.4.6", "pytest": "9.2.0"}


def test_check_names_the_missing_pin_and_the_pin_without_a_wheel(tmp_path):
    lock = write_lock(tmp_path, PINS)
    problems, missing, summary, _ = cl.check(lock, tmp_path / "pyproject.toml", ["mlx-lm-lora"], "macos-arm64",
                                             "3.12", resolve=fake_resolver(no_wheel={"numpy", "mlx-cpu"}))
    assert missing == {"mlx-metal": ["==0.32.4"]}
    assert any("mlx-metal is needed (by mlx)" in p for p in problems)
    assert any(p.startswith("macOS arm64, Python 3.12: numpy==2.4.6 has no wheel") for p in problems)
    assert not any("mlx-cpu" in p for p in problems)  # no macOS wheel, and macOS does not need it
    assert "not needed here: mlx-cpu" in summary
    cl.add_pins(lock, {"mlx-metal": "0.32.4"})
    lines = lock.read_text().splitlines()
    assert lines[0] == "# header" and lines.index("mlx-metal==0.32.4") == lines.index("mlx-lm-lora==5.10.2") + 1
    problems, missing, summary, _ = cl.check(lock, tmp_path / "pyproject.toml", ["mlx-lm-lora"], "macos-arm64",
                                             "3.12", resolve=fake_resolver(no_wheel={"mlx-cpu"}))
    assert (problems, missing) == ([], {})
    assert summary.startswith("macOS arm64, Python 3.12: 7 of 7 needed pins have wheels")


def test_skipped_pins_are_resolved_only_when_needed(tmp_path):
    lock = write_lock(tmp_path, dict(PINS, **{"mlx-metal": "0.32.4"}))
    calls = []
    problems, _, _, failed = cl.check(lock, tmp_path / "pyproject.toml", ["mlx-lm-lora"], "linux-aarch64", "3.13",
                                      resolve=fake_resolver(no_wheel={"mlx-metal"}, calls=calls), skip={"mlx-cpu"})
    assert problems == [] and failed == {"mlx-metal"}
    assert len(calls) == 2 and calls[1] == ["mlx-cpu==0.32.4"]  # skipped, then needed (mlx[cpu]): asked alone


def test_pip_failure_is_read_back():
    stderr = ("WARNING: Location 'file:///x' is ignored\n"
              "ERROR: Ignored the following versions that require a different python version: 0.0.7 Requires-Python "
              ">=3.11; 0.0.8 Requires-Python >=3.12\n"
              "ERROR: Could not find a version that satisfies the requirement annotated-doc==0.0.7 (from versions: "
              "0.0.1)\nERROR: No matching distribution found for annotated-doc==0.0.7\n")
    assert cl.pip_failure(stderr) == ("annotated-doc", "needs Python >=3.11")
    assert cl.pip_failure("ERROR: No matching distribution found for mlx-cpu==0.32.4\n") == \
        ("mlx-cpu", "no wheel for this platform and Python")
    assert cl.pip_failure("ERROR: something else\n") is None


def test_wheel_platforms():
    mac, linux = cl.wheel_platforms("macos-arm64"), cl.wheel_platforms("linux-aarch64")
    assert mac[0] == "macosx_14_0_arm64" and "macosx_11_0_arm64" in mac and "macosx_10_13_universal2" in mac
    assert not any("x86_64" in p or p.startswith("macosx_15") for p in mac)
    assert linux[0] == "manylinux_2_35_aarch64" and "manylinux_2_17_aarch64" in linux and "manylinux2014_aarch64" in linux


def test_the_lock_pins_what_a_mac_needs_of_mlx():
    """mlx on macOS needs mlx-metal at its own version: the lock must pin it (pip freeze on Linux never lists it)."""
    pins = cl.read_lock(ROOT / "requirements.lock")
    assert pins["mlx-metal"][1] == pins["mlx"][1] == pins["mlx-cpu"][1]


# tools/find_python.sh, with fake Pythons on a PATH that holds nothing else


def fake_python(bindir, name, version):
    """A script that answers find_python.sh's two questions as Python `version` would ("" = does not run)."""
    short = ".".join(version.split(".")[:2])
    body = (f'case "$2" in *version_info*) echo {short};; *) echo {version};; esac' if version
            else 'echo "pyenv: not installed" >&2; exit 127')
    path = bindir / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def find_python(bindir, given="", versions=("3.14", "3.13", "3.12", "3.11")):
    run = subprocess.run(["/bin/sh", str(ROOT / "tools" / "find_python.sh"), given, *versions],
                         capture_output=True, text=True, env={"PATH": str(bindir)})
    return run.returncode, run.stdout.strip()


@pytest.fixture
def bindir(tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    return d


def test_find_python_takes_the_newest_that_runs(bindir):
    fake_python(bindir, "python3", "3.9.6")
    fake_python(bindir, "python3.12", "3.12.4")
    fake_python(bindir, "python3.11", "3.11.9")
    fake_python(bindir, "python3.13", "")  # a shim without its Python
    assert find_python(bindir) == (0, "python3.12")
    assert find_python(bindir, "python3.11") == (0, "python3.11")


def test_find_python_falls_back_to_python3_only_when_it_fits(bindir):
    fake_python(bindir, "python3", "3.13.1")
    assert find_python(bindir) == (0, "python3")


@pytest.mark.parametrize("case", ["old python3", "no python3", "unfit PY"])
def test_find_python_says_in_one_line_what_it_found_and_how_to_get_one(bindir, case):
    if case != "no python3":
        fake_python(bindir, "python3", "3.9.6")
    rc, out = find_python(bindir, "python3" if case == "unfit PY" else "")
    assert rc == 1 and "\n" not in out and out.startswith("mesp-mlx: needs Python 3.11 to 3.14")
    found = {"old python3": f"python3 is Python 3.9.6 ({bindir}/python3)", "no python3": "no python3 on the PATH",
             "unfit PY": f"PY=python3 is Python 3.9.6 ({bindir}/python3)"}[case]
    assert found in out
    assert "brew install python@3.14" in out and "sudo apt install python3.11 python3.11-venv" in out
    assert not out.endswith(".")  # make's $(error) adds the full stop


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_stops_in_one_line_without_a_python_that_fits(bindir, tmp_path):
    """`make demo` on a Mac as it comes: its python3 is 3.9. Nothing runs; one line says why."""
    for f in ("Makefile", "pyproject.toml", "requirements.lock", "tools/find_python.sh"):
        (tmp_path / f).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / f, tmp_path / f)
    fake_python(bindir, "python3", "3.9.6")
    os.symlink("/bin/sh", bindir / "sh")
    run = subprocess.run([shutil.which("make"), "-C", str(tmp_path), "--no-print-directory", "demo"],
                         capture_output=True, text=True, env={"PATH": str(bindir)})
    assert run.returncode == 2 and run.stdout == "" and not (tmp_path / ".venv").exists()
    assert re.fullmatch(r"Makefile:\d+: \*\*\* mesp-mlx: needs Python 3\.11 to 3\.14 .*python3 is Python 3\.9\.6 .*"
                        r"brew install .*apt install .*\.  Stop\.\n", run.stderr)
