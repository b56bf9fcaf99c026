# shellcheck shell=bash
# Shared helpers for scripts/test and friends. Source it; it defines functions
# and a few variables and runs nothing.
#
#   ensure_apt PKG...          install Debian packages that are missing (idempotent)
#   find_python 3.X            print the path of a working CPython 3.X, or fail
#   tree_hash ARGS...          sha256 of the named files (missing ones count as empty)
#   ensure_venv DIR PY FN [VENV_OPT...]
#                              (re)build venv DIR from PY with install function FN,
#                              skipped when its stamp matches
#   has_py DIR                 true if DIR exists and holds at least one .py file

SNPD_ROOT=${SNPD_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}

# Quiet, non-interactive pip everywhere.
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

# pip_install VENV ARGS... : `pip install --quiet ARGS` in VENV. The machine's
# pip.conf may name local indexes that do not exist; pip warns about each on
# every call, so those lines (only those) are dropped.
pip_install() {
    local venv=$1
    shift
    "$venv/bin/python" -m pip install --quiet "$@" \
        2> >(grep -v "^WARNING: Location '.*' is ignored: it is neither a file nor a directory" >&2)
}

say()  { printf '%s\n' "$*"; }
hdr()  { printf '\n==== %s ====\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die()  { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

# ensure_apt PKG... : apt-get install only the packages dpkg does not report as
# installed. `apt-get update` runs at most once per top-level run (the marker
# lives in $SNPD_RUN_DIR when set, so it also holds across subshells).
ensure_apt() {
    local p
    local -a missing=()
    for p in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$p")
        fi
    done
    ((${#missing[@]} == 0)) && return 0
    if ! command -v apt-get >/dev/null 2>&1; then
        warn "apt-get not available; install these by hand: ${missing[*]}"
        return 1
    fi
    local -a sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    local marker=${SNPD_RUN_DIR:-/tmp}/.apt-updated
    if [[ ! -e $marker && -z ${_SNPD_APT_UPDATED:-} ]]; then
        say "apt-get update"
        "${sudo[@]}" apt-get update -qq || return 1
        _SNPD_APT_UPDATED=1
        [[ -n ${SNPD_RUN_DIR:-} ]] && : >"$marker"
    fi
    say "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq \
        --no-install-recommends "${missing[@]}" || return 1
}

# _python_ok CANDIDATE 3.X : print the interpreter's real path if it is a
# working, non-venv CPython 3.X that can create venvs (venv + ensurepip).
# Exit 2 if it is the right version but lacks ensurepip (Debian without
# python3.X-venv), 1 for anything else.
_python_ok() {
    "$1" - "$2" 2>/dev/null <<'EOF'
import platform, sys
want = tuple(int(x) for x in sys.argv[1].split("."))
if sys.version_info[:2] != want or platform.python_implementation() != "CPython":
    sys.exit(1)
if sys.prefix != sys.base_prefix:  # an activated virtualenv, not a base interpreter
    sys.exit(1)
try:
    import ensurepip, venv  # noqa: F401
except ImportError:
    sys.exit(2)
print(sys.executable)
EOF
}

# find_python 3.X : PATH's python3.X (pyenv shims included; they fail for
# versions that are not selected, which is fine), then $(pyenv root)/versions,
# then /root/.pyenv/versions, newest patch release first.
find_python() {
    local v=$1 c out rc root
    local -a cands=() roots=() no_venv=()
    mapfile -t cands < <(type -ap "python$v" 2>/dev/null || true)
    root=$(pyenv root 2>/dev/null || true)
    [[ -n $root ]] && roots+=("$root")
    [[ ${PYENV_ROOT:-} ]] && roots+=("$PYENV_ROOT")
    roots+=(/root/.pyenv)
    for root in "${roots[@]}"; do
        [[ -d $root/versions ]] || continue
        while IFS= read -r c; do
            cands+=("$c")
        done < <(printf '%s\n' "$root/versions/$v".*/bin/"python$v" | sort -rV)
    done
    for c in "${cands[@]}"; do
        [[ -x $c ]] || continue
        rc=0
        out=$(_python_ok "$c" "$v") || rc=$?
        if ((rc == 0)) && [[ -n $out ]]; then
            printf '%s\n' "$out"
            return 0
        fi
        ((rc == 2)) && no_venv+=("$c")
    done
    # Debian's own interpreter without its venv package: install it and retry.
    for c in "${no_venv[@]}"; do
        if [[ $c == /usr/bin/* ]] && ensure_apt "python$v-venv" >&2; then
            out=$(_python_ok "$c" "$v") && [[ -n $out ]] && { printf '%s\n' "$out"; return 0; }
        fi
    done
    return 1
}

# tree_hash FILE... [-- STRING...] : one sha256 over the files' contents (and
# names) plus extra strings.
tree_hash() {
    local f
    {
        while (($#)) && [[ $1 != -- ]]; do
            printf '== %s\n' "$1"
            [[ -f $1 ]] && cat -- "$1"
            shift
        done
        (($#)) && shift
        printf '%s\n' "$@"
    } | sha256sum | cut -d' ' -f1
}

# ensure_venv DIR PYTHON INSTALL_FN [VENV_OPT...] : DIR is a venv of PYTHON
# (made with `PYTHON -m venv VENV_OPT... DIR`, e.g. --system-site-packages) into
# which INSTALL_FN DIR has installed everything. The stamp DIR/.snpd-stamp holds
# a hash of pyproject.toml, scripts/*requirements*.txt, the interpreter, the repo
# path, the body of INSTALL_FN and the VENV_OPTs; while it matches, nothing is
# reinstalled. (Without VENV_OPTs the hash is the one computed before they
# existed, so venvs made without them keep their stamps.)
ensure_venv() {
    local dir=$1 py=$2 fn=$3 key pyver
    shift 3
    local -a venv_opts=("$@")
    pyver=$("$py" -c 'import sys; print(sys.version)') || return 1
    key=$(tree_hash "$SNPD_ROOT/pyproject.toml" "$SNPD_ROOT"/scripts/*requirements*.txt \
        -- "$py" "$pyver" "$SNPD_ROOT" "$(declare -f "$fn")" ${venv_opts[@]+"${venv_opts[@]}"})
    if [[ -x $dir/bin/python && -f $dir/.snpd-stamp && $(<"$dir/.snpd-stamp") == "$key" ]] \
        && "$dir/bin/python" -c '' 2>/dev/null; then
        say "venv ${dir#"$SNPD_ROOT"/} is up to date"
        return 0
    fi
    say "building venv ${dir#"$SNPD_ROOT"/} from $py${venv_opts[*]+ (${venv_opts[*]})}"
    rm -rf "$dir"
    "$py" -m venv ${venv_opts[@]+"${venv_opts[@]}"} "$dir" || return 1
    "$fn" "$dir" || { warn "installing into $dir failed"; return 1; }
    printf '%s\n' "$key" >"$dir/.snpd-stamp"
}

has_py() {
    [[ -d $1 ]] && [[ -n $(find "$1" -name '*.py' -print -quit 2>/dev/null) ]]
}

# public_python PYTHON : print the path of an interpreter of PYTHON's installation
# that any uid can run. The integration tests run the daemon as the unprivileged
# snpd test user, under the venv's interpreter. pyenv's installations live under
# /root (mode 0700), which that user cannot search, and their RUNPATH points
# there: the loader fails to find libpython, or (3.11) finds Debian's and runs
# Debian's standard library instead. Such an installation is copied once (its
# test suites left out) to $SNPD_PUBLIC_PYTHONS/NAME, root-owned and not
# writable by others, with RUNPATH set to $ORIGIN/../lib by patchelf.
SNPD_PUBLIC_PYTHONS=${SNPD_PUBLIC_PYTHONS:-/opt/snpd-test/python}
_runs_unprivileged() { # PYTHON PREFIX : it starts as nobody and sees its own prefix
    command -v setpriv >/dev/null || return 1
    [[ $(cd / && setpriv --reuid=65534 --regid=65534 --clear-groups "$1" -S -c \
        'import sys; print(sys.base_prefix)' 2>/dev/null) == "$2" ]]
}
public_python() {
    local py=$1 prefix name dest exe tmp stamp
    [[ $(id -u) -eq 0 ]] || { printf '%s\n' "$py"; return 0; }
    prefix=$("$py" -S -c 'import sys; print(sys.base_prefix)') || return 1
    if _runs_unprivileged "$py" "$prefix"; then
        printf '%s\n' "$py"
        return 0
    fi
    name=$(basename "$prefix")
    dest=$SNPD_PUBLIC_PYTHONS/$name
    exe=$dest/bin/$(basename "$py")
    stamp="copy 2: $prefix $(stat -c %Y "$py")"  # bump "copy N" when the recipe changes
    if [[ -f $dest/.snpd-source && $(<"$dest/.snpd-source") == "$stamp" ]] &&
        _runs_unprivileged "$exe" "$dest"; then
        printf '%s\n' "$exe"
        return 0
    fi
    ensure_apt patchelf >&2 || return 1
    say "copying $prefix to $dest (the daemon's test user cannot reach it)" >&2
    install -d -m 0755 "$SNPD_PUBLIC_PYTHONS"
    tmp=$(mktemp -d "$SNPD_PUBLIC_PYTHONS/.copy.XXXXXX")
    # The bytecode comes along: the test user cannot write it, and a daemon or
    # client that compiles the standard library at every start is 3 times slower.
    tar -C "$prefix" --exclude='./lib/python*/test' --exclude='./lib/python*/idlelib' \
        --exclude='./lib/python*/tkinter' -cf - . |
        tar -C "$tmp" --no-same-owner -xf - || { rm -rf "$tmp"; return 1; }
    local f
    for f in "$tmp"/bin/python3*; do
        [[ -f $f && ! -L $f ]] && readelf -d "$f" 2>/dev/null | grep -q 'R.*PATH' &&
            { patchelf --set-rpath '$ORIGIN/../lib' "$f" || { rm -rf "$tmp"; return 1; }; }
    done
    chown -R root:root "$tmp"
    chmod -R go-w,a+rX "$tmp"
    chmod 0755 "$tmp"
    "$tmp/bin/$(basename "$py")" -m compileall -q -j 0 "$tmp/lib" >/dev/null 2>&1 || true
    printf '%s\n' "$stamp" >"$tmp/.snpd-source"
    rm -rf "$dest"
    mv "$tmp" "$dest"
    _runs_unprivileged "$exe" "$dest" || { warn "$exe does not run unprivileged"; return 1; }
    printf '%s\n' "$exe"
}
