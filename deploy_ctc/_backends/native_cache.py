"""Building native shared libraries from ``kernels/`` at run time, into a per-user cache that is verified on load.

:func:`build_library` compiles C++ sources of the kernels folder with the system's compiler (``$CXX``, else the
first of ``c++``, ``g++``, ``clang++`` on ``PATH``) into a shared library and returns its path; the native CPU engine
(:mod:`deploy_ctc._backends.cpu.native_build`) is one user. A library is compiled once per machine: its file name
digests everything the build depends on (the sources, the headers beside them and in the include directories, other
files named by the caller, the compiler and its version, the flags, the CPU model and features, since
``-march=native`` code may not run on another CPU), so a later process loads it without compiling and an upgrade,
an edit or a different CPU sharing the home directory gets its own build. Builds are logged at INFO level on this
module's logger.

**Where**: ``$DEPLOY_CTC_CACHE_DIR``, else ``$XDG_CACHE_HOME/deploy_ctc``, else ``~/.cache/deploy_ctc`` (the home
directory from ``$HOME``, else the user's passwd entry). Relative paths are never used: a relative
``XDG_CACHE_HOME`` is ignored (as the XDG specification asks), a relative ``DEPLOY_CTC_CACHE_DIR`` is refused.
Missing directories are created with mode 0700.

**What is trusted** (the rules OpenSSH's StrictModes applies to ``~/.ssh``): the cache directory must be owned by
the current user and not writable by group or others; every directory above it must belong to the user or root and
not be writable by group or others unless it has the sticky bit (``/tmp``); symbolic links on the way must belong
to the user or root, and are followed. A library is loaded only if it is a
regular file (not a link) owned by the user, not writable by group or others, whose SHA-256 matches the digest
written beside it when it was built, and whose ELF dynamic symbol table defines the entry points the caller needs.
A file that fails those checks (truncated, empty, foreign, without the entry points) is rebuilt, with a warning in
the log; it is never loaded.

**Fallback**: a cache directory that cannot be trusted or written gets one ``RuntimeWarning`` naming the path and
the reason, and the process builds into a private temporary directory (mode 0700, removed at exit), so every such
process compiles again.

**Concurrency**: a build happens under an exclusive POSIX record lock on a lock file in the cache (processes
starting together compile once; the others wait, then load the result); the compiler writes to a temporary name
that is fsync'd, checked and renamed into place, then its digest is written the same way. An interrupted build
(KeyboardInterrupt, a timeout) kills the compiler's whole process group and removes its temporary file. A process
forked while another thread builds starts with fresh locks (record locks are not inherited) and builds or waits on
its own; :func:`os.fork` waits while a compiler is being started, so the child never holds the parent's pipes.

No compiler, a failed build, or no trusted directory to build in raises :class:`NativeUnavailable` with the reason.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import platform
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

try:
    import fcntl
    import pwd
except ImportError:  # not a POSIX system: build_library says so
    fcntl = pwd = None  # type: ignore[assignment]

from .kernel_sources import kernel_sources_dir

CACHE_ENV = "DEPLOY_CTC_CACHE_DIR"

#: Target flags tried in this order until the compiler accepts one set: code for this machine's CPU, with 256-bit
#: vectors preferred on x86 (the CPU engine's short, frame-to-frame dependent loops ran about twice as fast as with
#: 512-bit vectors on an AMD EPYC), then for this CPU, then generic code.
NATIVE_TARGETS: tuple[tuple[str, ...], ...] = (("-march=native", "-mprefer-vector-width=256"), ("-march=native",), ())

#: Flags of every build: position-independent code linked as a shared library.
SHARED_FLAGS = ("-fPIC", "-shared")

#: Suffixes of the files in the source and include directories that a source may include: their contents are part
#: of the build's key.
HEADER_SUFFIXES = (".h", ".hpp", ".cuh", ".inc")

COMPILE_TIMEOUT_S = 300
#: How long a process waits for another one's build of the same library before building privately.
LOCK_TIMEOUT_S = 900
# Part of every key: changing how libraries are built, named or verified invalidates the old ones.
_LAYOUT = b"deploy_ctc native cache 2"


class NativeUnavailable(RuntimeError):
    """A native library could not be built or loaded; the message says why."""


_logger = logging.getLogger("deploy_ctc._backends.native_cache")
_build_lock = threading.Lock()  # one build at a time in a process; replaced in a forked child
_spawn_lock = threading.Lock()  # held while a compiler starts, and by os.fork (see _run)
_private: tuple[Path, int] | None = None  # (temporary directory, the process that made it and removes it)
_warned: set[str] = set()


def build_library(name: str, sources: Sequence[str], *, symbols: Iterable[str], compile_flags: Sequence[str] = (),
                  link_flags: Sequence[str] = (), include_dirs: Sequence[str | os.PathLike] = (),
                  depends: Sequence[str | os.PathLike] = (),
                  target_flags: Sequence[Sequence[str]] = NATIVE_TARGETS, source_dir: str | os.PathLike | None = None,
                  description: str | None = None, compiler: str | None = None,
                  shared_flags: Sequence[str] = SHARED_FLAGS) -> Path:
    """Compile ``sources`` into a shared library in the verified per-user cache; its path, ready for ``dlopen``.

    The command is ``$CXX <compile_flags> <target> -I<source_dir> -I<include_dirs>... <shared_flags> <sources> -o
    <library> <link_flags>``, with ``<target>`` the first entry of ``target_flags`` the compiler accepts. A verified
    library built earlier (by any process, with any of the target flag sets) is returned without compiling. Call it
    once per process and keep the path: each call runs ``$CXX --version`` and digests the inputs.

    Args:
        name: the library's stem, letters, digits, ``_`` and ``-`` (the file is ``<name>-<digest>.so``).
        sources: file names inside ``source_dir`` (e.g. ``["ctc_cpu.cpp"]``).
        symbols: entry points the library must export (checked in its ELF dynamic symbol table before it is
            returned, so a library without them is rebuilt rather than loaded).
        compile_flags: flags before the target flags (e.g. ``("-std=c++17", "-O3")``).
        link_flags: flags after the sources (e.g. ``("-Wl,--version-script=...", "-Wl,-z,defs")``).
        include_dirs: extra ``-I`` directories (``source_dir`` is always on the include path); the headers at their
            top level (:data:`HEADER_SUFFIXES`) are part of the library's key.
        depends: other files the build reads (headers in subfolders, a version script): their contents are part of
            the library's key, so editing one rebuilds it.
        target_flags: alternatives tried in order; ``[()]`` for one portable build.
        source_dir: the folder of ``sources``; default the kernels folder.
        description: what the INFO log line says is built (default ``name``).
        compiler: the compiler driver to run instead of :func:`find_compiler`'s (nvcc, say); its path and
            ``--version`` output are part of the key.
        shared_flags: the flags making a shared library of position-independent code (default
            :data:`SHARED_FLAGS`; nvcc takes ``-fPIC`` through ``-Xcompiler``).

    Raises:
        NativeUnavailable: no compiler, a missing source, a failed build (the compiler's messages), a built
            library without ``symbols``, no trusted directory to build in, or not a POSIX system.
        ValueError: ``name`` or a source name that is not a plain file name.
    """
    if fcntl is None:
        raise NativeUnavailable("native libraries are built on POSIX systems only")
    if not name or not all(ch.isalnum() or ch in "_-" for ch in name):
        raise ValueError(f"name must hold letters, digits, '_' and '-' only, got {name!r}")
    symbols = tuple(symbols)
    try:
        folder = Path(source_dir).resolve() if source_dir is not None else kernel_sources_dir()
    except FileNotFoundError as error:
        raise NativeUnavailable(str(error)) from None
    source_paths = [folder / source for source in sources]
    for source, path in zip(sources, source_paths):
        if path.parent != folder or path.name in ("", ".", ".."):
            raise ValueError(f"sources must name a file directly inside {folder}, got {source!r}")
        if not path.is_file():
            raise NativeUnavailable(f"source {source!r} is not a file in {folder} (an incomplete installation?)")
    compiler = compiler or find_compiler()
    include_paths = [folder, *(Path(d).resolve() for d in include_dirs)]
    include = [f"-I{d}" for d in include_paths]
    key = _key(name, compiler, source_paths, include_paths, depends, [*compile_flags, *include, *link_flags])
    builds = []  # (command up to the sources, link flags, file name), in order of preference
    for target in target_flags:
        command = [compiler, *compile_flags, *target, *include, *shared_flags, *map(str, source_paths)]
        digest = key.copy()
        digest.update("\0".join(target).encode())
        builds.append((command, list(link_flags), f"{name}-{digest.hexdigest()[:24]}.so"))
    what = description or name
    with _build_lock:
        cache, reason = _trusted_cache()
        if cache is not None:
            try:
                return _build_shared(cache, f"{name}-{key.hexdigest()[:24]}.lock", builds, symbols, what)
            except _CacheUnusable as error:
                reason = str(error)
        if reason and reason not in _warned:  # once per process and reason, whichever library is built
            _warned.add(reason)
            warnings.warn(f"deploy_ctc: not using the cache directory: {reason}; native libraries are built in a "
                          f"private temporary directory removed at exit, so every process compiles them again",
                          RuntimeWarning, stacklevel=2)
        private = _private_dir()
        try:
            return _find(private, builds, symbols) or _compile_first(private, builds, symbols, what)
        except _WriteFailed as error:
            raise NativeUnavailable(f"cannot write into {private} ({error.__cause__})") from None


def cache_dir() -> Path | None:
    """The configured cache directory (see the module docstring), or None where no absolute path can be formed."""
    return _configured_cache()[0]


def find_compiler() -> str:
    """Path of the C++ compiler: ``$CXX`` or the first of c++, g++, clang++ on PATH.

    Raises:
        NativeUnavailable: none found.
    """
    wanted = os.environ.get("CXX")
    candidates = [wanted] if wanted else ["c++", "g++", "clang++"]
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    raise NativeUnavailable(f"no C++ compiler found (tried {', '.join(candidates)}; set CXX)")


class _CacheUnusable(Exception):
    """The cache directory cannot take a build (not writable, or another process's build never ends)."""


def _build_shared(cache, lock_name, builds, symbols, what):
    """Find or build a library in the trusted ``cache``, building under the lock file ``lock_name``."""
    found = _find(cache, builds, symbols, quiet=True)  # (a build may be between its rename and its digest)
    if found:
        return found
    try:
        with _exclusive(cache / lock_name):
            found = _find(cache, builds, symbols)  # built while this process waited, or damaged
            if found:
                return found
            for _, _, file in builds:  # left by a killed build: only the lock holder writes these names
                for stale in cache.glob(f"{file}.*.partial"):
                    stale.unlink(missing_ok=True)
            try:
                return _compile_first(cache, builds, symbols, what)
            except _WriteFailed as error:
                raise _CacheUnusable(f"{cache} is not writable ({error.__cause__})") from None
    except OSError as error:
        raise _CacheUnusable(f"{cache} is not writable ({error})") from None


def _find(folder, builds, symbols, quiet=False):
    """The first of ``builds`` already in ``folder`` that passes :func:`_verify`, else None."""
    for _, _, file in builds:
        problem = _verify(folder / file, symbols)
        if problem is None:
            return folder / file
        if problem and not quiet:
            _logger.warning("rebuilding %s: %s", folder / file, problem)
    return None


class _WriteFailed(Exception):
    """Writing a build's files into its folder failed (the ``__cause__`` says how)."""


def _compile_first(folder, builds, symbols, what):
    """Build the first of ``builds`` the compiler accepts into ``folder``."""
    errors = []
    for command, link_flags, file in builds:
        try:
            return _compile(folder, command, link_flags, file, symbols, what)
        except NativeUnavailable as error:
            errors.append(str(error))
    raise NativeUnavailable(f"the build of {what} failed:\n" + "\n".join(errors))


def _compile(folder, command, link_flags, file, symbols, what):
    """Compile to a temporary name in ``folder``, check it, rename it to ``file`` and write its digest beside it."""
    try:
        handle, partial = tempfile.mkstemp(dir=folder, prefix=f"{file}.", suffix=".partial")
        os.close(handle)
    except OSError as error:
        raise _WriteFailed() from error
    try:
        _logger.info("building %s (once per machine and version): %s", what, " ".join(command))
        start = time.perf_counter()
        status, messages = _run([*command, "-o", partial, *link_flags], COMPILE_TIMEOUT_S)
        if status != 0:
            raise NativeUnavailable(f"{' '.join(command)}: {messages.strip()[-2000:]}")
        try:
            os.chmod(partial, 0o700)  # the linker creates it under the umask
            data = _read_synced(partial)
        except OSError as error:
            raise _WriteFailed() from error
        problem = _library_problem(data, symbols)
        if problem:
            raise NativeUnavailable(f"{command[0]} built a library that {problem}")
        target = folder / file
        try:
            os.replace(partial, target)
            _write_atomically(_digest_path(target), hashlib.sha256(data).hexdigest() + "\n")
            _sync_dir(folder)
        except OSError as error:
            raise _WriteFailed() from error
        _logger.info("built %s in %.1f s", target, time.perf_counter() - start)
        return target
    finally:
        with contextlib.suppress(OSError):
            os.unlink(partial)


def _run(command, timeout):
    """``(exit status, output)`` of ``command``, run in its own process group; on any interruption (a timeout,
    KeyboardInterrupt), the whole group is killed (a compiler driver's cc1plus, as and ld too) before the exception
    passes on.

    The output goes to an unnamed temporary file, not a pipe, and the process starts under ``_spawn_lock``, which
    :func:`os.fork` waits for: a process forked from another thread while Popen starts the child would otherwise
    inherit the write ends of its pipes, and waiting for them to close would last as long as that process (forever,
    if it waits for this build).
    """
    # A KeyboardInterrupt raised inside Popen, between the fork and the assignment of the pid, would leave the
    # compiler running unseen: SIGINT is held back until Popen has returned.
    process = None
    # tempfile's first use in a process takes a module lock (while it probes the temporary directory) that a process
    # forked meanwhile would inherit held, so it is made under _spawn_lock too.
    with _spawn_lock:
        output = tempfile.TemporaryFile()
    with output:
        try:
            with _spawn_lock, _sigint_deferred():
                process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output,
                                           stderr=subprocess.STDOUT, start_new_session=True)
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            raise NativeUnavailable(f"{' '.join(command)}: no result after {timeout} s") from None
        except OSError as error:
            _kill_group(process)
            raise NativeUnavailable(f"{command[0]} could not be run: {error}") from None
        except BaseException:
            _kill_group(process)
            raise
        output.seek(0)
        return process.returncode, output.read().decode(errors="replace")


@contextlib.contextmanager
def _sigint_deferred():
    """Run the block with SIGINT recorded instead of handled, then handle it. Only the main thread can change the
    handler, and only the main thread is interrupted by SIGINT, so elsewhere the block runs as it is."""
    received = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
        installed = True
    except ValueError:  # not the main thread (of the main interpreter)
        installed = False
    try:
        yield
    finally:
        if installed:
            # None: a handler installed outside Python, which this module cannot reinstall; default to Python's.
            signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
            if received and callable(previous):
                previous(signal.SIGINT, received[0])  # the default handler raises KeyboardInterrupt here
            elif received and previous == signal.SIG_DFL:
                raise KeyboardInterrupt


def _kill_group(process):
    if process is None:
        return  # it never started
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # start_new_session: the group's id is the driver's pid
    with contextlib.suppress(ChildProcessError):
        process.wait()


def _key(name, compiler, sources, include_paths, depends, flags):
    """SHA-256 of everything a build depends on except its target flags: the sources, the headers at the top of
    each include directory, ``depends``, the compiler and its version, the CPU, the other flags."""
    status, version = _run([compiler, "--version"], 60)
    if status != 0:
        raise NativeUnavailable(f"{compiler} --version failed: {version.strip()[-2000:]}")
    headers = [path for folder in include_paths if folder.is_dir() for path in folder.iterdir()
               if path.suffix in HEADER_SUFFIXES and path.is_file()]
    files = sorted({*sources, *headers, *(Path(p).resolve() for p in depends)})
    key = hashlib.sha256()
    for part in (_LAYOUT, name.encode(), compiler.encode(), version.encode(), platform.machine().encode(),
                 _cpu_identity().encode(), "\0".join(flags).encode()):
        key.update(part + b"\0\0")
    for path in files:
        try:
            key.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0\0")
        except OSError as error:
            raise NativeUnavailable(f"cannot read {path}: {error}") from None
    return key


def _cpu_identity():
    """The CPU's model and feature flags (what ``-march=native`` depends on), where the OS tells them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keep = [line for line in text.splitlines() if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(sorted(set(keep)))


# --- Where: the configured directory, its trust, the private fallback -------------------------------------------

def _configured_cache():
    """``(path, reason)``: the absolute cache directory, or ``(None, why there is none)``."""
    value = os.environ.get(CACHE_ENV)
    if value:
        if not os.path.isabs(value):
            return None, f"{CACHE_ENV}={value!r} is not an absolute path"
        return Path(value), ""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):  # a relative one is invalid and ignored (XDG Base Directory specification)
        return Path(xdg) / "deploy_ctc", ""
    home = os.environ.get("HOME", "")
    if not os.path.isabs(home) and pwd is not None:
        try:
            home = pwd.getpwuid(os.getuid()).pw_dir
        except KeyError:
            home = ""
    if not os.path.isabs(home):
        return None, "no absolute home directory (HOME is unset or relative, and the user has no passwd entry)"
    return Path(home) / ".cache" / "deploy_ctc", ""


def _trusted_cache():
    """``(directory, "")`` for a cache directory that exists (created 0700 where missing) and can be trusted,
    else ``(None, reason)``."""
    path, reason = _configured_cache()
    if path is None:
        return None, reason
    try:
        _make_private_dirs(path)
    except OSError as error:
        return None, f"{path} could not be created ({error})"
    reason = _untrusted(path)
    return (None, reason) if reason else (path, "")


def _make_private_dirs(path):
    """Create the missing directories of ``path`` with mode 0700 (whatever the umask)."""
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            continue  # another process made it: the trust check judges it
        os.chmod(folder, 0o700)


def _untrusted(path):
    """Why the existing directory ``path`` must not hold libraries to load, or "" (see the module docstring).

    Symbolic links are resolved one component at a time, so every link and every directory on the way is checked.
    """
    uid = os.geteuid()
    current, pending, links = Path("/"), list(Path(path).parts[1:]), 0
    while True:
        try:
            info = os.stat(current)
        except OSError as error:
            return f"{current} cannot be inspected ({error})"
        if info.st_uid not in (0, uid):
            return f"{current} is owned by uid {info.st_uid}, not by this user (uid {uid}) or root"
        if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
            return f"{current} is writable by group or others (mode {stat.S_IMODE(info.st_mode):o})"
        if not pending:
            break
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            current = current.parent
            continue
        candidate = current / part
        try:
            info = os.lstat(candidate)
        except OSError as error:
            return f"{candidate} cannot be inspected ({error})"
        if stat.S_ISLNK(info.st_mode):
            if info.st_uid not in (0, uid):
                return f"{candidate} is a symbolic link owned by uid {info.st_uid}"
            links += 1
            if links > 40:
                return f"{path} has too many levels of symbolic links"
            target = Path(os.readlink(candidate))
            if target.is_absolute():
                current, pending = Path("/"), list(target.parts[1:]) + pending
            else:
                pending = list(target.parts) + pending
            continue
        if not stat.S_ISDIR(info.st_mode):
            return f"{candidate} is not a directory"
        current = candidate
    if info.st_uid != uid:
        return f"{current} is owned by uid {info.st_uid}, not by this user (uid {uid})"
    if info.st_mode & 0o022:
        return (f"{current} is writable by group or others (mode {stat.S_IMODE(info.st_mode):o}; "
                f"`chmod go-w {current}` makes it usable)")
    return ""


def _private_dir():
    """This process's temporary build directory (mode 0700, removed at exit by the process that made it)."""
    global _private
    if _private is None or _private[1] != os.getpid():
        try:
            path = Path(tempfile.mkdtemp(prefix="deploy_ctc-"))
        except OSError as error:
            raise NativeUnavailable(f"no temporary directory to build in ({error})") from None
        atexit.register(_remove_private, path, os.getpid())
        reason = _untrusted(path)
        if reason:
            raise NativeUnavailable(f"no trusted directory to build in: {reason}")
        _private = (path, os.getpid())
    return _private[0]


def _remove_private(path, owner):
    if os.getpid() == owner:  # not in a forked child that exits through atexit
        shutil.rmtree(path, ignore_errors=True)


# --- Files: locking, atomic writes, verification -----------------------------------------------------------------

@contextlib.contextmanager
def _exclusive(path):
    """Hold an exclusive POSIX record lock on ``path`` (created 0600), polling until :data:`LOCK_TIMEOUT_S`.

    Record locks belong to the process: a forked child holds none of its parent's, and the kernel releases them when
    a process dies, so a killed build never blocks the next one.
    """
    handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise _CacheUnusable(f"another process has held {path} for over {LOCK_TIMEOUT_S} s") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(handle)  # releases the lock


def _read_synced(path):
    """Flush ``path`` to disk and return its bytes."""
    handle = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(handle)
        with os.fdopen(os.dup(handle), "rb") as file:
            return file.read()
    finally:
        os.close(handle)


def _write_atomically(path, text):
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(partial)


def _sync_dir(folder):
    handle = os.open(folder, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _digest_path(library):
    return library.with_name(library.name + ".sha256")


def _verify(path, symbols):
    """None if ``path`` may be loaded, "" if it does not exist, else what is wrong with it."""
    try:
        data = _read_own_file(path)
    except FileNotFoundError:
        return ""
    except _Foreign as error:
        return str(error)
    try:
        recorded = _read_own_file(_digest_path(path)).decode("ascii", "replace").strip()
    except FileNotFoundError:
        return "it has no digest file (an interrupted or foreign build)"
    except _Foreign as error:
        return str(error)
    if hashlib.sha256(data).hexdigest() != recorded:
        return "its SHA-256 does not match the digest recorded when it was built (damaged or replaced)"
    problem = _library_problem(data, symbols)
    return f"it {problem}" if problem else None


class _Foreign(Exception):
    """A cache file that is not this user's own regular file."""


def _read_own_file(path):
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise
    except OSError as error:  # ELOOP: a symbolic link
        raise _Foreign(f"{path} cannot be opened as a regular file ({error})") from None
    try:
        info = os.fstat(handle)
        if not stat.S_ISREG(info.st_mode):
            raise _Foreign(f"{path} is not a regular file")
        if info.st_uid != os.geteuid():
            raise _Foreign(f"{path} is owned by uid {info.st_uid}, not by this user")
        if info.st_mode & 0o022:
            raise _Foreign(f"{path} is writable by group or others")
        with os.fdopen(os.dup(handle), "rb") as file:
            return file.read()
    finally:
        os.close(handle)


def _library_problem(data, symbols):
    """What is wrong with the shared library ``data`` (bytes), or None: a well-formed ELF shared object whose
    segments and sections lie inside the file and whose dynamic symbol table defines every one of ``symbols``."""
    if data[:4] != b"\x7fELF":
        if sys.platform == "darwin":
            return None  # Mach-O: the digest is the check
        return "is not an ELF file" if data else "is empty"
    try:
        return _elf_problem(data, symbols)
    except (struct.error, IndexError, KeyError, ValueError, OverflowError):
        return "is not a valid ELF file (truncated or damaged)"


def _elf_problem(data, symbols):
    wide = {1: False, 2: True}[data[4]]
    order = {1: "<", 2: ">"}[data[5]]
    header = struct.unpack_from(order + ("HHIQQQIHHHHHH" if wide else "HHIIIIIHHHHHH"), data, 16)
    e_type, phoff, shoff, phentsize, phnum, shentsize, shnum = (header[0], header[4], header[5], header[8],
                                                                header[9], header[10], header[11])
    if e_type != 3:  # ET_DYN
        return "is not a shared library"
    for i in range(phnum):  # program headers: what the loader maps
        if wide:
            _, _, offset, _, _, filesz, _, _ = struct.unpack_from(order + "IIQQQQQQ", data, phoff + i * phentsize)
        else:
            _, offset, _, _, filesz, _, _, _ = struct.unpack_from(order + "IIIIIIII", data, phoff + i * phentsize)
        if offset + filesz > len(data):
            return "is truncated (a segment ends past the end of the file)"
    sections = []  # (type, offset, size, link, entsize)
    for i in range(shnum):
        fields = struct.unpack_from(order + ("IIQQQQIIQQ" if wide else "IIIIIIIIII"), data, shoff + i * shentsize)
        sections.append((fields[1], fields[4], fields[5], fields[6], fields[9]))
        if fields[1] != 8 and fields[4] + fields[5] > len(data):  # SHT_NOBITS occupies no file space
            return "is truncated (a section ends past the end of the file)"
    defined = set()
    for kind, offset, size, link, entsize in sections:
        if kind != 11:  # SHT_DYNSYM
            continue
        strings_offset, strings_size = sections[link][1], sections[link][2]
        for at in range(offset, offset + size - entsize + 1, entsize or 1):
            if wide:
                name, _, _, shndx, _, _ = struct.unpack_from(order + "IBBHQQ", data, at)
            else:
                name, _, _, _, _, shndx = struct.unpack_from(order + "IIIBBH", data, at)
            if shndx == 0 or name >= strings_size:  # undefined (imported) symbol
                continue
            start = strings_offset + name
            defined.add(data[start:data.index(b"\0", start)].decode("ascii", "replace"))
    missing = [symbol for symbol in symbols if symbol not in defined]
    if missing:
        return f"does not export {', '.join(missing)}"
    return None


def _before_fork():
    _spawn_lock.acquire()


def _after_fork_in_parent():
    _spawn_lock.release()


def _after_fork_in_child():
    """A child forked while another thread built holds none of the parent's threads: give it free locks (the
    parent's record lock is not inherited, so the child waits for the parent's build like any other process)."""
    global _build_lock, _spawn_lock
    _build_lock = threading.Lock()
    _spawn_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)
