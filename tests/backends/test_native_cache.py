"""deploy_ctc._backends.native_cache: building native libraries into a per-user cache that is trusted and verified.

A one-function source stands in for the kernels (it compiles in well under a second), and a stand-in compiler (a
shell script) makes builds slow, counted or interruptible where a test needs that. Anything that loads a library
that might be damaged runs in a child process, so a crash fails the test instead of killing pytest. A planted
library announces itself by creating a marker file from its constructor: the marker must never appear.
"""

import ctypes
import hashlib
import logging
import os
import pwd
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from deploy_ctc._backends import native_cache
from tests.utils.compiler import needs_compiler

REPO = Path(__file__).resolve().parents[2]


pytestmark = needs_compiler

TINY = 'extern "C" int tiny_answer() { return 42; }\n'
# A library an attacker could plant: its constructor runs as soon as it is loaded.
PLANTED = textwrap.dedent("""\
    #include <cstdio>
    __attribute__((constructor)) static void announce() { if (FILE* f = std::fopen("{marker}", "w")) std::fclose(f); }
    extern "C" int tiny_answer() { return 666; }
    """)

# Builds the tiny library with the arguments of the test's build_library call, loads it and calls it.
CHILD = """
import ctypes, sys
from deploy_ctc._backends import native_cache
path = native_cache.build_library("tiny", ["tiny.cpp"], symbols=["tiny_answer"], source_dir=sys.argv[1],
                                  target_flags=[()])
print(path)
print(ctypes.CDLL(str(path)).tiny_answer())
"""


@pytest.fixture
def sources(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "tiny.cpp").write_text(TINY)
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache directory in DEPLOY_CTC_CACHE_DIR (not created yet)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(native_cache.CACHE_ENV, str(folder))
    monkeypatch.setattr(native_cache, "_warned", set())
    return folder


def build(sources, **options):
    return native_cache.build_library("tiny", ["tiny.cpp"], symbols=["tiny_answer"], source_dir=sources,
                                      target_flags=[()], **options)


def compile_planted(destination, marker):
    source = destination.with_suffix(".planted.cpp")
    source.write_text(PLANTED.replace("{marker}", str(marker)))
    subprocess.run([native_cache.find_compiler(), "-fPIC", "-shared", str(source), "-o", str(destination)],
                   check=True, timeout=120)
    source.unlink()


def child_env(**extra):
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}


def run_child(sources, **env):
    """``(path, answer, stderr)`` of :data:`CHILD` run in a fresh interpreter."""
    result = subprocess.run([sys.executable, "-c", CHILD, str(sources)], capture_output=True, text=True,
                            env=child_env(**env), timeout=300)
    assert result.returncode == 0, result.stderr
    path, answer = result.stdout.split()
    return Path(path), int(answer), result.stderr


def fake_compiler(folder, delay=0.0):
    """A compiler that counts its builds in ``folder/builds.log``, records the pid of a helper process it waits on
    (a stand-in for cc1plus) in ``folder/helper.pid``, then compiles for real."""
    real = native_cache.find_compiler()
    script = folder / "fake-c++"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        if [ "$1" = --version ]; then exec {real} --version; fi
        echo build >> {folder}/builds.log
        sleep {delay} &
        echo $! > {folder}/helper.pid
        wait
        exec {real} "$@"
        """))
    script.chmod(0o755)
    return script


def builds(folder):
    log = folder / "builds.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


# --- Building and reuse ------------------------------------------------------------------------------------------

def test_a_build_is_verified_cached_and_reused(sources, cache, caplog):
    with caplog.at_level(logging.INFO, logger="deploy_ctc._backends.native_cache"):
        path = build(sources)
        assert path.parent == cache and path.name.startswith("tiny-") and path.suffix == ".so"
        digest = path.with_name(path.name + ".sha256").read_text().strip()
        assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
        assert ctypes.CDLL(str(path)).tiny_answer() == 42
        assert sum("building tiny" in record.message for record in caplog.records) == 1
        assert build(sources) == path
        assert sum("building tiny" in record.message for record in caplog.records) == 1  # not rebuilt
    assert not list(cache.glob("*.partial"))


def test_an_edited_source_builds_a_new_library(sources, cache):
    first = build(sources)
    (sources / "tiny.cpp").write_text(TINY.replace("42", "43"))
    second = build(sources)
    assert second != first and ctypes.CDLL(str(second)).tiny_answer() == 43


def test_headers_flags_and_named_files_are_part_of_the_key(sources, cache, tmp_path):
    """What a library like an ONNX Runtime op library passes: an include directory, hidden visibility and a version
    script exporting one symbol. Editing a header or the script builds a new library."""
    include = tmp_path / "include"
    include.mkdir()
    (include / "answer.h").write_text("#define ANSWER 42\n")
    (sources / "tiny.cpp").write_text('#include "answer.h"\n#define EXPORT __attribute__((visibility("default")))\n'
                                      'extern "C" EXPORT int tiny_answer() { return ANSWER; }\n'
                                      'extern "C" EXPORT int tiny_hidden() { return 0; }\n')
    script = tmp_path / "exports.map"
    script.write_text("{ global: tiny_answer; local: *; };\n")

    def build_with_script():
        return native_cache.build_library("tiny", ["tiny.cpp"], symbols=["tiny_answer"], source_dir=sources,
                                          compile_flags=("-O2", "-fvisibility=hidden"), include_dirs=[include],
                                          link_flags=(f"-Wl,--version-script={script}",), depends=[script],
                                          target_flags=[()])

    first = build_with_script()
    library = ctypes.CDLL(str(first))
    assert library.tiny_answer() == 42 and not hasattr(library, "tiny_hidden")
    (include / "answer.h").write_text("#define ANSWER 43\n")
    second = build_with_script()
    assert second != first and ctypes.CDLL(str(second)).tiny_answer() == 43
    script.write_text("{ global: tiny_answer; tiny_hidden; local: *; };\n")
    third = build_with_script()
    assert third not in (first, second) and ctypes.CDLL(str(third)).tiny_hidden() == 0


def test_the_key_holds_the_cpu_so_another_cpus_build_is_never_picked(sources, cache, monkeypatch):
    first = build(sources)
    monkeypatch.setattr(native_cache, "_cpu_identity", lambda: "model name : another CPU\nflags : avx512f")
    assert build(sources) != first


def test_missing_directories_are_created_private_whatever_the_umask(sources, tmp_path, monkeypatch):
    folder = tmp_path / "a" / "b" / "cache"
    monkeypatch.setenv(native_cache.CACHE_ENV, str(folder))
    previous = os.umask(0)
    try:
        path = build(sources)
    finally:
        os.umask(previous)
    assert path.parent == folder
    for created in (tmp_path / "a", tmp_path / "a" / "b", folder):
        assert stat.S_IMODE(created.stat().st_mode) == 0o700
    assert not stat.S_IMODE(path.stat().st_mode) & 0o022


def test_a_library_without_the_entry_points_is_an_error(sources, cache):
    with pytest.raises(native_cache.NativeUnavailable, match="does not export tiny_missing"):
        native_cache.build_library("tiny", ["tiny.cpp"], symbols=["tiny_missing"], source_dir=sources,
                                   target_flags=[()])


@pytest.mark.parametrize("name", ["../tiny", "", "a b", "tiny.so"])
def test_a_library_name_with_a_path_or_a_dot_is_refused(sources, cache, name):
    with pytest.raises(ValueError, match="name must hold letters"):
        native_cache.build_library(name, ["tiny.cpp"], symbols=[], source_dir=sources)


def test_a_source_outside_the_folder_is_refused(sources, cache):
    with pytest.raises(ValueError, match="must name a file directly inside"):
        native_cache.build_library("tiny", ["../src/tiny.cpp"], symbols=[], source_dir=sources)


def test_a_missing_source_is_reported(sources, cache):
    with pytest.raises(native_cache.NativeUnavailable, match="source 'absent.cpp' is not a file in"):
        native_cache.build_library("tiny", ["absent.cpp"], symbols=[], source_dir=sources)


# --- Where the cache is ------------------------------------------------------------------------------------------

def test_the_default_is_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv(native_cache.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert native_cache.cache_dir() == tmp_path / "deploy_ctc"


@pytest.mark.parametrize("xdg", ["relative/cache", ""])
def test_a_relative_xdg_cache_home_is_ignored(monkeypatch, tmp_path, xdg):
    monkeypatch.delenv(native_cache.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert native_cache.cache_dir() == tmp_path / ".cache" / "deploy_ctc"


@pytest.mark.parametrize("home", [None, "", "relative-home"])
def test_without_an_absolute_home_the_passwd_entry_is_used(monkeypatch, home):
    monkeypatch.delenv(native_cache.CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    if home is None:
        monkeypatch.delenv("HOME", raising=False)
    else:
        monkeypatch.setenv("HOME", home)
    assert native_cache.cache_dir() == Path(pwd.getpwuid(os.getuid()).pw_dir) / ".cache" / "deploy_ctc"


def test_no_home_at_all_builds_privately_with_a_warning(sources, monkeypatch, tmp_path):
    monkeypatch.delenv(native_cache.CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(native_cache.pwd, "getpwuid", lambda uid: (_ for _ in ()).throw(KeyError(uid)))
    monkeypatch.setattr(native_cache, "_warned", set())
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    assert native_cache.cache_dir() is None
    with pytest.warns(RuntimeWarning, match="no absolute home directory"):
        path = build(sources)
    assert path.parent.name.startswith("deploy_ctc-") and not list((tmp_path / "cwd").iterdir())


def test_a_relative_cache_variable_is_refused_and_nothing_is_written_in_the_working_directory(
        sources, monkeypatch, tmp_path):
    monkeypatch.setenv(native_cache.CACHE_ENV, "relative-cache")
    monkeypatch.setattr(native_cache, "_warned", set())
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.warns(RuntimeWarning, match="DEPLOY_CTC_CACHE_DIR='relative-cache' is not an absolute path"):
        path = build(sources)
    assert path.is_absolute() and not list((tmp_path / "cwd").iterdir())


# --- Hostile cache directories: refused with one warning, never loaded from ---------------------------------------

def plant_valid_library(folder, sources, marker, tmp_path):
    """Build the tiny library in a private cache to learn its name, then plant a marker-writing library under that
    name in ``folder``, with a matching digest file (only the directory's trust can reject it)."""
    name = build(sources).name
    folder.mkdir(exist_ok=True)
    planted = folder / name
    compile_planted(planted, marker)
    planted.with_name(name + ".sha256").write_text(hashlib.sha256(planted.read_bytes()).hexdigest() + "\n")
    planted.chmod(0o700)
    return planted


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757, 0o770])
def test_a_cache_writable_by_group_or_others_is_refused(sources, cache, tmp_path, monkeypatch, mode):
    hostile = tmp_path / "hostile"
    marker = tmp_path / "planted-code-ran"
    plant_valid_library(hostile, sources, marker, tmp_path)
    hostile.chmod(mode)
    monkeypatch.setenv(native_cache.CACHE_ENV, str(hostile))
    with pytest.warns(RuntimeWarning, match=f"{hostile} is writable by group or others") as caught:
        path = build(sources)
        build(sources)
    assert len(caught) == 1  # one warning per process
    assert hostile not in path.parents and ctypes.CDLL(str(path)).tiny_answer() == 42
    assert not marker.exists()


@pytest.mark.parametrize("sticky", [False, True])
def test_a_parent_writable_by_others_is_refused_unless_sticky(sources, cache, tmp_path, monkeypatch, sticky):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777 if sticky else 0o777)
    monkeypatch.setenv(native_cache.CACHE_ENV, str(shared / "mine"))
    if sticky:  # like /tmp: others cannot rename or remove this user's entries
        assert build(sources).parent == shared / "mine"
    else:
        with pytest.warns(RuntimeWarning, match=f"{shared} is writable by group or others"):
            assert shared not in build(sources).parents


def test_a_symlink_to_a_hostile_directory_is_refused(sources, cache, tmp_path, monkeypatch):
    hostile = tmp_path / "hostile"
    marker = tmp_path / "planted-code-ran"
    plant_valid_library(hostile, sources, marker, tmp_path)
    hostile.chmod(0o777)
    link = tmp_path / "link"
    link.symlink_to(hostile)
    monkeypatch.setenv(native_cache.CACHE_ENV, str(link))
    with pytest.warns(RuntimeWarning, match=f"{hostile} is writable by group or others"):
        path = build(sources)
    assert hostile not in path.parents and ctypes.CDLL(str(path)).tiny_answer() == 42
    assert not marker.exists()


def test_a_symlink_to_a_private_directory_is_followed(sources, cache, tmp_path, monkeypatch):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    monkeypatch.setenv(native_cache.CACHE_ENV, str(tmp_path / "link" / "cache"))
    path = build(sources)
    assert path.resolve().parent == real / "cache"


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_cache_owned_by_another_user_is_refused(sources, cache, tmp_path, monkeypatch):
    hostile = tmp_path / "hostile"
    marker = tmp_path / "planted-code-ran"
    planted = plant_valid_library(hostile, sources, marker, tmp_path)
    for path in (hostile, planted, planted.with_name(planted.name + ".sha256")):
        os.chown(path, 65534, 65534)
    hostile.chmod(0o700)
    monkeypatch.setenv(native_cache.CACHE_ENV, str(hostile))
    with pytest.warns(RuntimeWarning, match=f"{hostile} is owned by uid 65534"):
        path = build(sources)
    assert hostile not in path.parents and not marker.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a link to another user needs root")
def test_a_symlink_owned_by_another_user_is_refused_even_to_a_private_directory(sources, cache, tmp_path,
                                                                                monkeypatch):
    """Like a link another user planted in /tmp under the name DEPLOY_CTC_CACHE_DIR gives: they could re-point it."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(private)
    os.lchown(link, 65534, 65534)
    monkeypatch.setenv(native_cache.CACHE_ENV, str(link))
    with pytest.warns(RuntimeWarning, match=f"{link} is a symbolic link owned by uid 65534"):
        path = build(sources)
    assert private not in path.parents


# --- Planted or damaged files in a trusted cache: rebuilt, never loaded ------------------------------------------

def test_a_planted_library_with_a_wrong_digest_is_rebuilt_not_loaded(sources, cache, tmp_path, caplog):
    path = build(sources)
    marker = tmp_path / "planted-code-ran"
    compile_planted(path, marker)  # same name, digest file left as it was
    with caplog.at_level(logging.WARNING, logger="deploy_ctc._backends.native_cache"):
        again = build(sources)
    assert again == path and ctypes.CDLL(str(again)).tiny_answer() == 42
    assert not marker.exists()
    assert any("does not match the digest" in record.message for record in caplog.records)


@pytest.mark.parametrize("plant", ["no digest file", "symlink", "mode 0666"])
def test_other_foreign_files_are_rebuilt_not_loaded(sources, cache, tmp_path, plant):
    path = build(sources)
    marker = tmp_path / "planted-code-ran"
    elsewhere = tmp_path / "elsewhere.so"
    compile_planted(elsewhere, marker)
    digest = path.with_name(path.name + ".sha256")
    path.unlink()
    if plant == "symlink":
        path.symlink_to(elsewhere)
        digest.write_text(hashlib.sha256(elsewhere.read_bytes()).hexdigest())
    else:
        elsewhere.rename(path)
        if plant == "no digest file":
            digest.unlink()
        else:
            path.chmod(0o666)
            digest.write_text(hashlib.sha256(path.read_bytes()).hexdigest())
    again = build(sources)
    assert again == path and not again.is_symlink() and ctypes.CDLL(str(again)).tiny_answer() == 42
    assert not marker.exists()


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty(path):
    path.write_bytes(b"")


def without_entry_points(path):
    """A well-formed library lacking ``tiny_answer``, with a matching digest: only the symbol check rejects it."""
    source = path.with_suffix(".other.cpp")
    source.write_text('extern "C" int something_else() { return 1; }\n')
    subprocess.run([native_cache.find_compiler(), "-fPIC", "-shared", str(source), "-o", str(path)], check=True,
                   timeout=120)
    source.unlink()
    path.with_name(path.name + ".sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "\n")


def garbage(path):
    path.write_bytes(b"\x7fELF" + os.urandom(4000))
    path.with_name(path.name + ".sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "\n")


@pytest.mark.parametrize("damage", [truncate, empty, without_entry_points, garbage], ids=lambda f: f.__name__)
def test_a_damaged_library_is_rebuilt_in_a_fresh_process_without_crashing(sources, cache, damage):
    path, answer, _ = run_child(sources, DEPLOY_CTC_CACHE_DIR=str(cache))
    damage(path)
    again, answer_again, errors = run_child(sources, DEPLOY_CTC_CACHE_DIR=str(cache))
    assert again == path and answer == answer_again == 42
    assert f"rebuilding {path}" in errors  # reported, not silent
    assert hashlib.sha256(path.read_bytes()).hexdigest() == \
        path.with_name(path.name + ".sha256").read_text().strip()


# --- Processes: concurrency, interruption, fork, an unusable cache -----------------------------------------------

def test_partial_files_of_a_killed_build_are_removed_by_the_next_one(sources, cache):
    path = build(sources)
    path.unlink()
    stale = path.with_name(path.name + ".x1y2z3.partial")
    stale.write_bytes(b"half a library")
    assert build(sources) == path and not stale.exists()


def test_eight_processes_starting_together_compile_once(sources, cache, tmp_path):
    compiler = fake_compiler(tmp_path, delay=1)
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(sources)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True,
                                 env=child_env(DEPLOY_CTC_CACHE_DIR=str(cache), CXX=str(compiler)))
                for _ in range(8)]
    outputs = [child.communicate(timeout=300) for child in children]
    assert all(child.returncode == 0 for child in children), [err for _, err in outputs]
    assert len({out for out, _ in outputs}) == 1 and outputs[0][0].split()[1] == "42"
    assert builds(tmp_path) == 1
    assert not list(cache.glob("*.partial"))


def wait_for(condition, timeout=120, why=""):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out {why}"
        time.sleep(0.05)


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_an_interrupted_build_leaves_no_partial_file_and_no_compiler(sources, cache, tmp_path):
    compiler = fake_compiler(tmp_path, delay=60)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(sources)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env=child_env(DEPLOY_CTC_CACHE_DIR=str(cache), CXX=str(compiler)))
    pid_file = tmp_path / "helper.pid"
    wait_for(lambda: pid_file.exists() and pid_file.read_text().strip())
    helper = int(pid_file.read_text())
    assert list(cache.glob("*.partial"))
    child.send_signal(signal.SIGINT)
    _, errors = child.communicate(timeout=60)
    assert child.returncode != 0 and "KeyboardInterrupt" in errors
    assert not list(cache.glob("*.partial")) and not list(cache.glob("*.so"))
    wait_for(lambda: not alive(helper), timeout=10, why=errors)  # the compiler's own children were killed too


def test_a_build_that_times_out_kills_the_compiler(sources, cache, tmp_path, monkeypatch):
    monkeypatch.setattr(native_cache, "COMPILE_TIMEOUT_S", 1)
    monkeypatch.setenv("CXX", str(fake_compiler(tmp_path, delay=60)))
    with pytest.raises(native_cache.NativeUnavailable, match="no result after 1 s"):
        build(sources)
    helper = int((tmp_path / "helper.pid").read_text())
    wait_for(lambda: not alive(helper), timeout=10)
    assert not list(cache.glob("*.partial"))


FORK_CHILD = """
import os, sys, threading, time
from pathlib import Path
from deploy_ctc._backends import native_cache
build = lambda: native_cache.build_library("tiny", ["tiny.cpp"], symbols=["tiny_answer"], source_dir=sys.argv[1],
                                           target_flags=[()])
builder = threading.Thread(target=build)
builder.start()
while sys.argv[3] == "compiling" and not Path(sys.argv[2]).exists():  # the compiler runs, locks held
    time.sleep(0.01)
pid = os.fork()
if pid == 0:
    try:
        print("child", build(), flush=True)
    finally:
        os._exit(0)
_, status = os.waitpid(pid, 0)
builder.join()
print("status", status)
"""


@pytest.mark.parametrize("moment", ["starting", "compiling"])
def test_a_process_forked_during_a_build_does_not_hang(sources, cache, tmp_path, moment):
    """Forked as the build thread starts (while it may be starting the compiler), or while the compiler runs."""
    compiler = fake_compiler(tmp_path, delay=1)
    result = subprocess.run([sys.executable, "-c", FORK_CHILD, str(sources), str(tmp_path / "helper.pid"), moment],
                            capture_output=True, text=True, timeout=120,
                            env=child_env(DEPLOY_CTC_CACHE_DIR=str(cache), CXX=str(compiler)))
    assert result.returncode == 0, result.stderr
    assert "status 0" in result.stdout and f"child {cache}" in result.stdout
    assert builds(tmp_path) == 1  # the child waited for the parent's build and loaded it (or the reverse)


def test_an_unwritable_cache_warns_once_and_leaves_no_temporary_directory(sources, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    temporary = tmp_path / "tmp"
    temporary.mkdir(mode=0o700)
    code = CHILD + "\nnative_cache.build_library('other', ['tiny.cpp'], symbols=[], source_dir=sys.argv[1])\n"
    result = subprocess.run([sys.executable, "-c", code, str(sources)], capture_output=True, text=True,
                            timeout=300, env=child_env(DEPLOY_CTC_CACHE_DIR=str(blocker / "cache"),
                                                       TMPDIR=str(temporary)))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("RuntimeWarning") == 1 and f"{blocker / 'cache'} could not be created" in \
        result.stderr
    assert Path(result.stdout.split()[0]).parent.parent == temporary
    assert not list(temporary.iterdir())  # removed at exit
