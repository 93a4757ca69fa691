#!/usr/bin/env bash
# Set up fourdstream's environment: system MPI + parallel HDF5, a virtual environment,
# h5py built against the MPI HDF5 (cached in a wheelhouse), and the package itself.
#
#   scripts/setup.sh [--test]      (--test also installs the test dependencies)
#
# Environment:
#   VENV                     virtual environment folder            (default: .venv)
#   PYTHON                   interpreter used to create it         (default: python3)
#   FOURDSTREAM_WHEELHOUSE   cache of the MPI-enabled h5py wheel    (default: ~/.cache/fourdstream/wheels)
#
# A second run with nothing changed takes about a second (stamp file in the venv).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
WHEELHOUSE=${FOURDSTREAM_WHEELHOUSE:-$HOME/.cache/fourdstream/wheels}
H5PY_VERSION=3.16.0
EXTRAS=""
[[ "${1:-}" == "--test" ]] && EXTRAS="[test]"

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

stamp="$VENV/.fourdstream-setup${EXTRAS:+-test}"
fingerprint=$(cat setup.cfg pyproject.toml scripts/setup.sh | sha1sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$fingerprint" ]]; then
    say "environment $VENV is up to date"
    exit 0
fi

# 1. System MPI and parallel HDF5 (Open MPI flavour; see shared toolchain notes).
if ! pkg-config --exists hdf5-openmpi 2>/dev/null || ! command -v mpiexec >/dev/null; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        say "installing Open MPI and parallel HDF5 from Debian (about a minute)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends libhdf5-openmpi-dev openmpi-bin pkg-config >/dev/null
    else
        die "Open MPI + parallel HDF5 not found. Install them (Debian/Ubuntu: 'sudo apt-get install libhdf5-openmpi-dev openmpi-bin pkg-config'; conda: 'conda env create -f environment.yml'; a cluster: load the site's MPI and cray-hdf5-parallel modules) and run this again."
    fi
fi

# 1b. For the tests: a real Slurm (run as a throwaway cluster by the tests of jobs/*.sbatch),
#     iproute2 for the network-namespace test, Chromium and its driver for the live page's
#     browser test. Without root/apt those tests skip, saying why.
if [[ -n "$EXTRAS" ]] && { ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null \
                          || ! command -v tc >/dev/null || ! command -v chromium >/dev/null; }; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        say "installing Slurm, munge, iproute2 and Chromium from Debian for the tests"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends slurm-wlm munge iproute2 chromium \
            chromium-driver >/dev/null
    else
        say "Slurm/Chromium not installed and no root/apt: their tests will be skipped"
    fi
fi

# 2. Virtual environment with the build requirements of h5py.
if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --disable-pip-version-check -U pip setuptools wheel cython numpy pkgconfig packaging mpi4py

# 3. h5py built against the MPI HDF5, kept in a wheelhouse so the next set-up takes seconds.
#    Never with build isolation (it would compile mpi4py from source: >20 GB RAM) and never
#    from pip's own cache (it does not know HDF5_MPI and would hand back a serial build).
if ! "$PY" -c "import h5py, sys; sys.exit(not h5py.get_config().mpi)" 2>/dev/null; then
    mkdir -p "$WHEELHOUSE"
    if ! ls "$WHEELHOUSE"/h5py-"$H5PY_VERSION"-*.whl >/dev/null 2>&1; then
        say "building h5py $H5PY_VERSION against MPI HDF5 into $WHEELHOUSE (4-6 minutes, once)"
        cfg=$(mktemp); printf '[build_ext]\nparallel = %s\n' "$(nproc)" > "$cfg"
        HDF5_MPI=ON CC=mpicc HDF5_PKGCONFIG_NAME=hdf5-openmpi H5PY_SETUP_REQUIRES=0 \
        DIST_EXTRA_CONFIG="$cfg" \
            "$PY" -m pip wheel -q --no-cache-dir --no-deps --no-binary=h5py --no-build-isolation \
            -w "$WHEELHOUSE" "h5py==$H5PY_VERSION"
        rm -f "$cfg"
    fi
    "$PY" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps \
        "$WHEELHOUSE"/h5py-"$H5PY_VERSION"-*.whl
fi
"$PY" -c "import h5py; assert h5py.get_config().mpi, 'h5py is not built with MPI'" \
    || die "h5py in $VENV is not MPI-enabled; remove $WHEELHOUSE and run again"

# 4. The package (editable) and, with --test, its test dependencies.
say "installing fourdstream$EXTRAS"
"$PY" -m pip install -q --disable-pip-version-check -e ".$EXTRAS"
"$PY" -c "import h5py; assert h5py.get_config().mpi, 'installing fourdstream replaced the MPI h5py'"

# 5. With --test: py4DSTEM (which needs numpy < 2) in an environment of its own, with this
#    package (no MPI needed there) for the test of `fourdstream export --to py4dstem`.
if [[ -n "$EXTRAS" ]]; then
    P4=${PY4DSTEM_VENV:-.venv-py4dstem}
    say "installing py4DSTEM 0.14.18 into $P4 (it pins numpy < 2)"
    [[ -x "$P4/bin/python" ]] || "$PYTHON" -m venv "$P4"
    "$P4/bin/python" -m pip install -q --disable-pip-version-check py4DSTEM==0.14.18 click \
        || die "py4DSTEM could not be installed into $P4"
    "$P4/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
fi

echo "$fingerprint" > "$stamp"
say "ready: $("$PY" -c 'import fourdstream, h5py, mpi4py; print(f"fourdstream {fourdstream.__version__}, h5py {h5py.__version__} (MPI), mpi4py {mpi4py.__version__}")')"
