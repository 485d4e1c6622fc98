#!/bin/sh
# The Python that `make` builds a virtual environment with (POSIX sh: macOS's /bin/sh, dash; any Python on the PATH):
#
#     sh tools/find_python.sh "$PY" 3.14 3.13 3.12 3.11
#
# The versions are those requirements.lock is checked for (`make check-lock`), in order of preference. Prints the
# Python to use: PY when given (it must be one of those versions), else the first of python3.14, python3.13, ... on
# the PATH that runs, else python3 when it is one of them. Otherwise prints one line starting "mesp-mlx:" that says
# which Python it found, which it needs and how to get one (the Makefile stops with it), and exits 1.
given=$1
shift
versions=$*

version_of() {  # "3.12" for a Python command, nothing (and status 1) when it does not run
    "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null
}

fits() {
    for v in $versions; do
        [ "$1" = "$v" ] && return 0
    done
    return 1
}

if [ -n "$given" ]; then
    candidates=$given
else
    candidates=
    for v in $versions; do
        candidates="$candidates python$v"
    done
    candidates="$candidates python3"
fi

for py in $candidates; do
    command -v "$py" >/dev/null 2>&1 || continue
    ver=$(version_of "$py") || continue
    if fits "$ver"; then
        echo "$py"
        exit 0
    fi
done

# Nothing fits: say what there is (shell built-ins only, so that this works whatever the PATH holds).
py=${given:-python3}
what=$py
[ -n "$given" ] && what="PY=$given"
if ! where=$(command -v "$py" 2>/dev/null); then
    found="there is no $py on the PATH"
elif full=$("$py" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null); then
    found="$what is Python $full ($where)"
else
    found="$what ($where) does not run"
fi
oldest= newest=
for v in $versions; do
    [ -z "$oldest" ] || [ "${v#*.}" -lt "${oldest#*.}" ] && oldest=$v
    [ -z "$newest" ] || [ "${v#*.}" -gt "${newest#*.}" ] && newest=$v
done
# No full stop at the end: make's $(error) adds one.
echo "mesp-mlx: needs Python $oldest to $newest (the versions requirements.lock is checked for), and $found." \
    "Get one - macOS: brew install python@$newest, or the python.org installer, or uv python install $newest;" \
    "Debian/Ubuntu: sudo apt install python$oldest python$oldest-venv (or the newer python3.X your release has);" \
    "then run make again, or make PY=/path/to/python3.X"
exit 1
