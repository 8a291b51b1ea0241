"""deploy_ctc._backends.cpu.native_build: the CPU engine kernels/ctc_cpu.cpp built, cached and loaded.

Builds that must start from an empty cache run in child processes with their own DEPLOY_CTC_CACHE_DIR; the failure
paths run in-process with the module's memoized state patched. The cache's rules themselves are tested with a tiny
library in tests/backends/test_native_cache.py.
"""

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from deploy_ctc._backends import native_cache
from deploy_ctc._backends.cpu import native_build
from tests.utils.compiler import needs_compiler

REPO = Path(__file__).resolve().parents[3]

pytestmark = needs_compiler

# Prints the loaded library's path and the loss of a fixed batch (float64, so runs compare exactly); builds are
# logged to stderr.
CHILD = """
import logging; logging.basicConfig(level=logging.INFO)
import numpy as np, deploy_ctc
from deploy_ctc._backends.cpu import native_build
lp = np.log(np.random.default_rng(0).dirichlet(np.ones(5), size=(12, 3)).astype(np.float64))
print(native_build.library()._name)
print(repr(float(deploy_ctc.ctc_loss(lp, np.array([[1, 2], [3, 3], [4, 0]]), [12, 12, 9], [2, 2, 1]))))
"""


def run_child(cache_dir, **env):
    environment = {**os.environ, "DEPLOY_CTC_CACHE_DIR": str(cache_dir), "DEPLOY_CTC_CPU_BACKEND": "native",
                   "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env}
    result = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=environment,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    path, loss = result.stdout.split()
    return Path(path), float(loss), result.stderr


@pytest.fixture
def fresh_state(monkeypatch):
    """The module's memoized library and failure, reset for this test and restored after it."""
    monkeypatch.setattr(native_build, "_library", None)
    monkeypatch.setattr(native_build, "_failure", None)


def test_library_exports_every_entry_point():
    lib = native_build.library()
    for entry in (*native_build.ENTRY_POINTS.values(), *native_build.NLL_ENTRY_POINTS.values(),
                  *native_build.ALIGN_ENTRY_POINTS.values()):
        assert getattr(lib, entry).restype is not None
    assert native_build.describe() == f"native engine {lib._name}" and lib._name.endswith(".so")


def test_build_is_cached_and_reused_by_later_processes(tmp_path):
    path, loss, errors = run_child(tmp_path)
    assert path.parent == tmp_path and path.is_file()
    assert "building the native CPU engine" in errors and f"built {path}" in errors
    again, loss_again, errors = run_child(tmp_path)
    assert again == path and "building" not in errors  # loaded, not rebuilt
    assert loss_again == loss
    assert not list(tmp_path.glob("*.partial"))
    path.write_bytes(path.read_bytes()[:4096])  # truncated: loading it would die of SIGBUS
    rebuilt, loss_rebuilt, errors = run_child(tmp_path)
    assert rebuilt == path and loss_rebuilt == loss
    assert f"rebuilding {path}" in errors and "building the native CPU engine" in errors


def stub_compiler(folder, delay=1, names=None):
    """A compiler that builds, slowly, a stub exporting ``names`` (default: the engine's entry points), whatever it
    is asked to compile, and counts its builds in ``folder/builds.log``: for the tests of processes, where the
    library never runs."""
    stub = folder / "stub.cpp"
    if names is None:
        names = [*native_build.ENTRY_POINTS.values(), *native_build.NLL_ENTRY_POINTS.values(),
                 *native_build.ALIGN_ENTRY_POINTS.values()]
    stub.write_text("".join(f'extern "C" int {name}() {{ return 0; }}\n' for name in names))
    compiler = folder / "slow-c++"
    compiler.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        if [ "$1" = --version ]; then echo stub 1.0; exit 0; fi
        out=; previous=
        for arg in "$@"; do [ "$previous" = -o ] && out=$arg; previous=$arg; done
        echo build >> {folder}/builds.log
        sleep {delay}
        exec {native_cache.find_compiler()} -fPIC -shared {stub} -o "$out"
        """))
    compiler.chmod(0o755)
    return compiler


def stub_environment(folder, cache, names=None, **extra):
    return {**os.environ, "DEPLOY_CTC_CACHE_DIR": str(cache), "CXX": str(stub_compiler(folder, names=names)),
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}


DESCRIBE = "from deploy_ctc._backends.cpu import native_build; print(native_build.describe())"


def test_concurrent_first_builds_share_one_library(tmp_path):
    environment = stub_environment(tmp_path, tmp_path / "cache")
    children = [subprocess.Popen([sys.executable, "-c", DESCRIBE], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=environment) for _ in range(4)]
    outputs = [child.communicate(timeout=300) for child in children]
    assert all(child.returncode == 0 for child in children), [err for _, err in outputs]
    library = next((tmp_path / "cache").glob("ctc_cpu-*.so"))
    assert {out for out, _ in outputs} == {f"native engine {library}\n"}
    assert len((tmp_path / "builds.log").read_text().splitlines()) == 1
    assert not list((tmp_path / "cache").glob("*.partial"))


def test_unwritable_cache_directory_builds_in_a_temporary_directory_removed_at_exit(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = subprocess.run([sys.executable, "-c", DESCRIBE], capture_output=True, text=True, timeout=300,
                            env=stub_environment(tmp_path, blocker / "cache"))
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.split()[-1])
    assert blocker not in path.parents and path.parent.name.startswith("deploy_ctc-")
    assert f"not using the cache directory: {blocker / 'cache'} could not be created" in result.stderr
    assert result.stderr.count("RuntimeWarning") == 1
    assert not path.parent.exists()  # the private directory went with the process


def test_missing_compiler_is_reported(fresh_state, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(native_build.NativeUnavailable, match=r"no C\+\+ compiler found \(tried /nonexistent/c\+\+"):
        native_build.library()
    assert "unavailable" in native_build.describe()


def test_failed_build_reports_the_compiler_output(fresh_state, monkeypatch, tmp_path):
    fake = tmp_path / "broken-c++"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo broken 1.0; exit 0; fi\n"
                    "echo 'error: this compiler is broken' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CXX", str(fake))
    monkeypatch.setenv("DEPLOY_CTC_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(native_build.NativeUnavailable, match="this compiler is broken"):
        native_build.library()
    left = [path.name for path in (tmp_path / "cache").iterdir()]
    assert all(name.endswith(".lock") for name in left), left  # nothing half-built left behind


def test_a_compiler_rejecting_the_preferred_flags_builds_with_the_next_set_once(tmp_path):
    """Flags the compiler rejects fall back to the next set; later processes load that build without retrying."""
    real = native_cache.find_compiler()
    log = tmp_path / "calls.log"
    fake = tmp_path / "picky-c++"
    fake.write_text(f"#!/bin/sh\necho \"$*\" >> {log}\n"
                    "case \"$*\" in *-mprefer-vector-width*) echo 'unrecognized option' >&2; exit 1;; esac\n"
                    f"exec {real} \"$@\"\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    path, loss, _ = run_child(tmp_path / "cache", CXX=str(fake))
    compiles = [line for line in log.read_text().splitlines() if "--version" not in line]
    assert len(compiles) == 2 and "-mprefer-vector-width=256" in compiles[0]
    assert "-march=native" in compiles[1] and "-mprefer-vector-width" not in compiles[1]
    again, loss_again, _ = run_child(tmp_path / "cache", CXX=str(fake))
    assert again == path and loss_again == loss
    assert [line for line in log.read_text().splitlines() if "--version" not in line] == compiles  # no new build


# A native library's first use starts on a thread; the process forks while that build holds the module's lock. The
# child gives up after a minute (SIGALRM) rather than hang forever where it would deadlock. {module}: the module
# whose describe() builds the library.
FORK_DURING_BUILD = """
import os, signal, sys, threading, time
from pathlib import Path
from {module} import describe
builder = threading.Thread(target=describe)
builder.start()
while not Path(sys.argv[1]).exists():
    time.sleep(0.01)
pid = os.fork()
if pid == 0:
    signal.alarm(60)
    try:
        print("child:", describe(), flush=True)
    finally:
        os._exit(0)
_, status = os.waitpid(pid, 0)
builder.join()
print("parent:", describe(), "status", status)
"""


def test_a_process_forked_during_the_first_build_does_not_hang(tmp_path):
    script = FORK_DURING_BUILD.format(module="deploy_ctc._backends.cpu.native_build")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "builds.log")],
                            capture_output=True, text=True, env=stub_environment(tmp_path, tmp_path / "cache"),
                            timeout=120)
    assert result.returncode == 0, result.stderr
    library = next((tmp_path / "cache").glob("ctc_cpu-*.so"))
    assert f"child: native engine {library}" in result.stdout
    assert f"parent: native engine {library} status 0" in result.stdout
    assert len((tmp_path / "builds.log").read_text().splitlines()) == 1  # the child loaded the parent's build
