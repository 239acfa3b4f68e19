"""Python graders' sandbox: the user's `grade(sample, item) -> float` runs in a fresh child process,
never in this one.

Layers, each of which holds on its own (tests/graders/test_sandbox.py checks every escape against
each layer alone, and all together):

1. bubblewrap (`bwrap`, the Debian package scripts/setup.sh installs): new network, pid, ipc and uts
   namespaces, and a file system of read-only binds of the system folders, this Python and its
   site-packages, and nothing else (not the project, /root, the server's home or its data), with a
   small tmpfs at /tmp as the only writable place. As root, bwrap runs privileged and keeps only CAP_SETUID/CAP_SETGID, which the child uses
   to become `nobody` before it reads the user's code: file permissions then apply, and so does
   RLIMIT_NPROC (the kernel exempts uid 0 from it, even inside a user namespace). Not as root, bwrap
   makes a user namespace instead.
2. seccomp (libseccomp through ctypes, compiled once here, loaded by bwrap or by the child): fork,
   vfork, clone of anything but a thread, sockets other than AF_UNIX, io_uring, ptrace, mount,
   unshare and setns fail with EPERM.
3. resource limits set by the child: CPU seconds, address space, no new processes (nor threads:
   graders run single-threaded), file size, open files, no core dumps; and a wall-clock deadline
   here, after which the process group is killed.
4. an audit hook (sys.addaudithook) installed before the user's code runs: sockets, subprocesses,
   fork/exec/spawn/kill, looking up such C functions through ctypes, rlimit changes and writes
   outside the scratch folder raise PermissionError. Python code can sometimes get around audit
   hooks, so this is the last line.

Without bwrap the child runs as a plain process (in a new network namespace when `unshare` works),
and each missing layer is logged once as a warning.

The protocol: the request (source, sample, item, limits) goes as JSON on stdin; the answer comes
back as one JSON object on a private copy of the child's stdout, while the user's own prints go to a
bounded buffer (returned as `output`) and file descriptors 1 and 2 go to the stderr pipe, which is
read here to a bound and shown only when the sandbox itself fails.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import ctypes.util
import json
import logging
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

log = logging.getLogger(__name__)

NOBODY = 65534
SCRATCH_MB = 64  # the writable tmpfs (its pages are not counted by RLIMIT_AS, so it stays small)
MAX_SOURCE_BYTES = 256 * 1024
DETAILS_LIMIT = 4096  # characters of a traceback kept in `details`
# System folders the child sees (read-only); a symlink among them (merged /usr) stays a symlink.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")

# auto: bwrap, else unshare, else a plain process; the others force one (the tests use them).
Isolation = Literal["auto", "bwrap", "unshare", "process"]


@dataclass(frozen=True)
class Limits:
    cpu_seconds: float = 5
    wall_seconds: float = 10
    memory_mb: int = 512
    output_kb: int = 64


@dataclass
class SandboxResult:
    score: float | None
    error_type: str | None  # "timeout" | "memory" | "runtime" | "invalid_return" | "sandbox"
    details: str | None
    execution_time: float
    output: str = ""  # what grade() printed, cut at Limits.output_kb


def check_source(source: str) -> str | None:
    """None when `source` compiles and defines a top-level `grade(sample, item)`; else the problem.
    Compiles only: nothing of the source runs here."""
    if len(source.encode("utf-8", "surrogatepass")) > MAX_SOURCE_BYTES:
        return f"the source is longer than {MAX_SOURCE_BYTES // 1024} KiB"
    try:
        tree = ast.parse(source, filename="<grader>")
        compile(tree, "<grader>", "exec", dont_inherit=True)
    except SyntaxError as e:
        if e.lineno is None:  # null bytes, on some Python versions
            return f"the source does not compile: {e.msg}"
        return f"syntax error at line {e.lineno}: {e.msg}"
    except (ValueError, RecursionError, MemoryError) as e:  # null bytes, absurd nesting
        return f"the source does not compile: {e}"
    defs = [
        n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == "grade"
    ]
    if not defs:
        return "the source must define a top-level function grade(sample, item)"
    grade = defs[-1]  # the last definition is the one that counts
    if isinstance(grade, ast.AsyncFunctionDef):
        return "grade must be a plain function (def), not async def"
    a = grade.args
    positional = len(a.posonlyargs) + len(a.args)
    required = positional - len(a.defaults)
    required_kwonly = sum(d is None for d in a.kw_defaults)
    if required > 2 or required_kwonly or (positional < 2 and a.vararg is None):
        return "grade must take two arguments: grade(sample, item)"
    return None


def run_python(source: str, sample: dict, item: dict, *, limits: Limits = Limits()) -> SandboxResult:
    """Run `grade(sample, item)` from `source` in a sandboxed child process and return its score,
    or the error that stopped it. Never raises for anything the user's code does."""
    return _run(source, sample, item, limits=limits)


def _run(
    source: str,
    sample: Any,
    item: Any,
    *,
    limits: Limits,
    isolation: Isolation = "auto",
    use_seccomp: bool = True,
    audit_hook: bool = True,
) -> SandboxResult:
    """run_python with its layers chosen (the tests check that each layer holds on its own)."""
    start = time.monotonic()
    try:
        request = json.dumps({"source": source, "sample": sample, "item": item}, allow_nan=False)
    except (TypeError, ValueError) as e:
        return SandboxResult(None, "sandbox", f"the sample or item is not JSON: {e}", 0.0)
    mode = _choose(isolation)
    program = _seccomp_program() if use_seccomp else None
    if use_seccomp and program is None:
        _warn_once("seccomp", "libseccomp not found: python graders run without a seccomp filter")
    scratch = "/tmp" if mode == "bwrap" else tempfile.mkdtemp(prefix="tunehouse-grader-")
    pass_fds: tuple[int, ...] = ()
    setup = {
        "limits": {
            "cpu": max(1, math.ceil(limits.cpu_seconds)),
            "memory": limits.memory_mb * 1024 * 1024,
            "output": limits.output_kb * 1024,
            "fsize": SCRATCH_MB * 1024 * 1024,
        },
        "scratch": scratch,
        "paths": _site_packages(),
        "drop_uid": NOBODY if mode == "bwrap" and os.geteuid() == 0 else None,
        "audit_hook": audit_hook,
        "seccomp": None,
    }
    try:
        if mode == "bwrap":
            argv = [*_bwrap_argv()]  # a copy: the cached list stays as it is
            if program is not None:
                read_end, write_end = os.pipe()
                os.write(write_end, program)  # a few hundred bytes: well under a pipe's buffer
                os.close(write_end)
                pass_fds = (read_end,)
                argv += ["--seccomp", str(read_end)]
            argv += ["--", _python()]
        else:
            argv = [*(UNSHARE if mode == "unshare" else ()), _python()]
            if program is not None:
                setup["seccomp"] = program.hex()
        argv += ["-I", "-S", "-c", BOOTSTRAP]
        payload = (json.dumps(setup) + "\n" + request).encode()
        result = _execute(argv, payload, scratch, pass_fds, limits, start)
    finally:
        for fd in pass_fds:
            os.close(fd)
        if mode != "bwrap":
            shutil.rmtree(scratch, ignore_errors=True)
    return result


# --- the parent's side: start, feed, read to a bound, kill on the deadline ------------------------


def _execute(
    argv: list[str], payload: bytes, scratch: str, pass_fds: tuple[int, ...], limits: Limits, start: float
) -> SandboxResult:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": scratch,
        "TMPDIR": scratch,
        "LANG": "C.UTF-8",
        # One thread each: RLIMIT_NPROC forbids new threads, and grading is parallel across items.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=scratch,
            env=env,
            pass_fds=pass_fds,
            start_new_session=True,  # its own process group (killed whole) and no controlling tty
        )
    except OSError as e:
        return SandboxResult(None, "sandbox", f"could not start the sandbox: {e}", time.monotonic() - start)
    deadline = start + limits.wall_seconds
    cap = limits.output_kb * 1024 + 4 * DETAILS_LIMIT + 1024
    out, err, timed_out = _communicate(proc, payload, deadline, cap)
    pid = status = 0
    while not timed_out:  # both pipes closed: it is exiting; wait for that, up to the deadline
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        timed_out = time.monotonic() >= deadline
        time.sleep(0.0005)
    if not pid:
        _kill(proc)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, with its CPU time, not by Popen
    elapsed = time.monotonic() - start
    if timed_out:
        return SandboxResult(
            None, "timeout", f"grade() did not finish within {limits.wall_seconds:g} s (wall clock)", elapsed
        )
    answer = _parse(out)
    if answer is not None:
        return SandboxResult(answer[0], answer[1], answer[2], elapsed, answer[3])
    return _died(proc.returncode, usage, err, limits, elapsed)


def _communicate(
    proc: subprocess.Popen, payload: bytes, deadline: float, cap: int
) -> tuple[bytes, bytes, bool]:
    """Write the payload and read both pipes until they close, keeping at most `cap` bytes of each,
    and wait for the exit; all before the deadline. Returns (stdout, stderr, timed_out)."""
    assert proc.stdin and proc.stdout and proc.stderr
    stdin, stdout, stderr = proc.stdin.fileno(), proc.stdout.fileno(), proc.stderr.fileno()
    buffers = {stdout: bytearray(), stderr: bytearray()}
    view = memoryview(payload)
    with selectors.DefaultSelector() as sel:
        for fd in (stdin, stdout, stderr):
            os.set_blocking(fd, False)
        sel.register(stdin, selectors.EVENT_WRITE)
        sel.register(stdout, selectors.EVENT_READ)
        sel.register(stderr, selectors.EVENT_READ)
        while sel.get_map() and (remaining := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(remaining):
                if key.fd == stdin:
                    try:
                        view = view[os.write(stdin, view[: 1 << 16]) :]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:  # it died before reading everything: its exit says why
                        view = view[:0]
                    if not view:
                        sel.unregister(stdin)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fd)
                buf = buffers[key.fd]
                buf += chunk[: max(0, cap - len(buf))]
        timed_out = bool(sel.get_map())
    if not proc.stdin.closed:
        proc.stdin.close()
    return bytes(buffers[stdout]), bytes(buffers[stderr]), timed_out


def _kill(proc: subprocess.Popen) -> None:
    # bwrap's own children die with it (--die-with-parent, and the pid namespace with its init).
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _parse(out: bytes) -> tuple[float | None, str | None, str | None, str] | None:
    """The child's answer, checked again here: the child runs the user's code and may lie."""
    try:
        answer = json.loads(out.decode("utf-8"), parse_constant=lambda c: None)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(answer, dict):
        return None
    output = answer.get("output") if isinstance(answer.get("output"), str) else ""
    error_type = answer.get("error_type")
    if error_type is not None:
        details = answer.get("details")
        return None, str(error_type), str(details)[-DETAILS_LIMIT:] if details is not None else None, output
    score = answer.get("score")
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        return None, "invalid_return", f"grade() must return a finite number, got {score!r}"[:200], output
    return float(score), None, None, output


def _died(returncode: int, usage: Any, err: bytes, limits: Limits, elapsed: float) -> SandboxResult:
    """No answer: the child died. Tell why from how it died (bwrap reports 128 + the signal)."""
    sig = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    # The kernel sends SIGXCPU at the soft CPU limit and SIGKILL a second later. Under bwrap the
    # child's CPU time does not reach our rusage (its pid namespace's init reaps it), so a SIGKILL
    # after the hard limit in wall-clock time counts as one too: with RLIMIT_AS set, the OOM
    # killer is the only other sender, and rarely.
    soft = max(1, math.ceil(limits.cpu_seconds))
    cpu = usage.ru_utime + usage.ru_stime
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and (cpu >= soft or elapsed >= soft + 1)):
        return SandboxResult(
            None, "timeout", f"grade() used more than {limits.cpu_seconds:g} s of CPU time", elapsed
        )
    if sig == signal.SIGKILL:
        return SandboxResult(
            None, "memory", "grade() was killed, most likely for using too much memory", elapsed
        )
    if sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT):
        return SandboxResult(None, "runtime", f"grade() crashed ({signal.Signals(sig).name})", elapsed)
    tail = err.decode("utf-8", "replace").strip()[-DETAILS_LIMIT:]
    return SandboxResult(
        None, "sandbox", f"the sandbox exited with status {returncode} and no answer: {tail}", elapsed
    )


# --- which layers this machine has (probed once, missing ones logged once) -----------------------

_warned: set[str] = set()
_warn_lock = threading.Lock()


def _warn_once(key: str, message: str) -> None:
    with _warn_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning(message)


def _choose(isolation: Isolation) -> Literal["bwrap", "unshare", "process"]:
    if isolation == "process":
        return "process"
    if isolation in ("auto", "bwrap"):
        problem = _bwrap_problem()
        if problem is None:
            return "bwrap"
        if isolation == "bwrap":
            raise RuntimeError(f"bubblewrap is not usable here: {problem}")
        _warn_once(
            "bwrap",
            f"python graders run without bubblewrap ({problem}): the file system is not read-only "
            "for them and they run as this user; seccomp, resource limits and the audit hook still "
            "hold. Install bubblewrap (scripts/setup.sh does).",
        )
    if _unshare_problem() is None:
        return "unshare"
    if isolation == "unshare":
        raise RuntimeError(f"unshare is not usable here: {_unshare_problem()}")
    _warn_once(
        "unshare",
        f"python graders run without a network namespace ({_unshare_problem()}); seccomp and the "
        "audit hook still refuse sockets",
    )
    return "process"


@lru_cache(maxsize=1)
def _bwrap_problem() -> str | None:
    """None when bwrap runs our argv here; else why not (not installed, namespaces refused)."""
    if shutil.which("bwrap") is None:
        return "bwrap is not installed"
    argv = [*_bwrap_argv(), "--", _python(), "-I", "-S", "-c", "pass"]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bwrap failed: {e}"
    if done.returncode != 0:
        return f"bwrap failed: {done.stderr.decode('utf-8', 'replace').strip()[-500:]}"
    return None


# Not as root, a user namespace too (in which this user stays itself, with no capability outside).
UNSHARE = (
    "unshare",
    *(() if os.geteuid() == 0 else ("--user", "--map-current-user")),
    "--net",
    "--ipc",
    "--uts",
    "--",
)


@lru_cache(maxsize=1)
def _unshare_problem() -> str | None:
    """None when `unshare` can make new network, ipc and uts namespaces here (root, or user
    namespaces allowed); else why not."""
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    try:
        done = subprocess.run([*UNSHARE, "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare failed: {e}"
    if done.returncode != 0:
        return f"unshare failed: {done.stderr.decode('utf-8', 'replace').strip()[-500:]}"
    return None


def _python() -> str:
    return os.path.realpath(sys.executable)


@lru_cache(maxsize=1)
def _site_packages() -> list[str]:
    """Where graders import numpy & co. from: this environment's site-packages, added to the
    child's sys.path by hand (`-S` skips site, and with it every .pth file)."""
    paths = sysconfig.get_paths()
    return sorted({os.path.realpath(paths[k]) for k in ("purelib", "platlib") if os.path.isdir(paths[k])})


@lru_cache(maxsize=1)
def _bwrap_argv() -> list[str]:
    argv = [
        "bwrap",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-pid",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--new-session",
        "--hostname",
        "sandbox",
    ]
    if os.geteuid() == 0:
        # Privileged bwrap: no user namespace, every capability dropped but the two the child needs
        # to become nobody (uid 0 is exempt from RLIMIT_NPROC even inside a user namespace).
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-user", "--disable-userns", "--cap-drop", "ALL"]
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    # This Python and its packages, wherever they live (under /root, in a venv in the project):
    # bwrap makes their parent folders, readable and empty but for them.
    python_dirs = {os.path.realpath(sys.base_prefix), os.path.dirname(_python()), *_site_packages()}
    made: set[str] = set()
    for path in sorted(python_dirs):
        if any(path == d or path.startswith(d + "/") for d in SYSTEM_DIRS) or any(
            path.startswith(p + "/") for p in python_dirs
        ):
            continue
        # Parents made by bwrap would copy the host's 0700 (/root): open them for nobody.
        parents = [p for p in _parents(path) if p not in made]
        for parent in parents:
            argv += ["--perms", "0755", "--dir", parent]
        made.update(parents)
        argv += ["--ro-bind", path, path]
    argv += [
        "--proc", "/proc",
        "--dev", "/dev",
        "--perms", "1777", "--size", str(SCRATCH_MB * 1024 * 1024), "--tmpfs", "/tmp",
        "--remount-ro", "/",
        "--chdir", "/tmp",
    ]  # fmt: skip
    return argv


def _parents(path: str) -> list[str]:
    """/a/b/c -> ["/a", "/a/b"]"""
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


# seccomp: libseccomp's constants (seccomp.h)
_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_CMP_NE = 1
_SCMP_CMP_MASKED_EQ = 7
_CLONE_THREAD = 0x00010000
_AF_UNIX = 1


# Calls a grader has no use for, each a way around the namespaces or a large attack surface
# (io_uring runs socket and file operations that the filter would not see).
_REFUSED_CALLS = (
    "io_uring_setup", "io_uring_enter", "io_uring_register", "ptrace", "process_vm_readv",
    "process_vm_writev", "mount", "umount2", "pivot_root", "unshare", "setns", "bpf",
    "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
)  # fmt: skip


def _scmp_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


@lru_cache(maxsize=1)
def _seccomp_program() -> bytes | None:
    """The BPF filter (for this machine's architecture), compiled once by libseccomp; None
    without libseccomp."""
    name = ctypes.util.find_library("seccomp")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ArgCmp)
    ]  # fmt: skip
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    ctx = lib.seccomp_init(_SCMP_ACT_ALLOW)
    if not ctx:
        return None
    eperm, enosys = _scmp_errno(1), _scmp_errno(38)
    rules: list[tuple[int, str, list[_ArgCmp]]] = [
        (eperm, "fork", []),
        (eperm, "vfork", []),
        # A new thread is a clone with CLONE_THREAD; anything else is a new process.
        (eperm, "clone", [_ArgCmp(0, _SCMP_CMP_MASKED_EQ, _CLONE_THREAD, 0)]),
        # clone3 passes its flags in memory, out of a filter's reach: ENOSYS makes glibc use clone.
        (enosys, "clone3", []),
        (eperm, "socket", [_ArgCmp(0, _SCMP_CMP_NE, _AF_UNIX, 0)]),
        *((eperm, name, []) for name in _REFUSED_CALLS),
    ]
    try:
        for action, syscall, cmps in rules:
            nr = lib.seccomp_syscall_resolve_name(syscall.encode())
            if nr == -1:  # __NR_SCMP_ERROR: no such call here
                continue
            array = (_ArgCmp * len(cmps))(*cmps) if cmps else None
            if lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), array) < 0:
                return None
        fd = os.memfd_create("tunehouse-seccomp")
        try:
            if lib.seccomp_export_bpf(ctx, fd) < 0:
                return None
            size = os.lseek(fd, 0, os.SEEK_CUR)
            return os.pread(fd, size, 0)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)


# --- the child's side ------------------------------------------------------------------------------
# Runs as `python -I -S -c BOOTSTRAP`: no site, no environment variables, only fast stdlib imports.
# It reads the request, drops to nobody, sets its limits, installs the audit hook, and only then
# compiles and runs the user's source.

BOOTSTRAP = r'''
import _signal, os, resource, sys  # _signal: `signal` imports enum, which is slow to import
# JSON through the json module's C scanner and encoder: `import json` costs more than the rest of
# this start-up (it compiles regular expressions), and the request is plain JSON with no NaN.
from _json import encode_basestring_ascii as quote, make_scanner

class JSONContext:
    strict, object_hook, object_pairs_hook = True, None, None
    parse_float, parse_int, parse_constant = float, int, float

scan = make_scanner(JSONContext)

def loads(text):
    value, end = scan(text, 0)
    if text[end:].strip():
        raise ValueError("extra data after the JSON value")
    return value

RESULT = os.dup(1)
os.dup2(2, 1)  # what C code writes to stdout lands with stderr, not in the answer
stdin = sys.stdin.buffer
setup = loads(stdin.readline().decode())
limits, scratch = setup["limits"], setup["scratch"]

def answer(obj):
    data = ("{" + ",".join(quote(k) + ":" + (repr(v) if type(v) is float else quote(v))
                           for k, v in obj.items()) + "}").encode()
    while data:
        data = data[os.write(RESULT, data):]
    os._exit(0)

def on_xcpu(signum, frame):
    answer({"error_type": "timeout", "details": "grade() used more than its CPU time"})

if setup["drop_uid"] is not None:
    uid = setup["drop_uid"]
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
R = resource
R.setrlimit(R.RLIMIT_CPU, (limits["cpu"], limits["cpu"] + 1))
R.setrlimit(R.RLIMIT_NPROC, (0, 0))
R.setrlimit(R.RLIMIT_FSIZE, (limits["fsize"], limits["fsize"]))
R.setrlimit(R.RLIMIT_NOFILE, (64, 64))
R.setrlimit(R.RLIMIT_CORE, (0, 0))
_signal.signal(_signal.SIGXCPU, on_xcpu)
_signal.signal(_signal.SIGXFSZ, _signal.SIG_IGN)  # a write past the limit fails instead of killing

if setup["seccomp"]:
    import ctypes
    program = bytes.fromhex(setup["seccomp"])
    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(38, 1, None, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    prog = Prog(len(program) // 8, program)
    if libc.prctl(22, 2, ctypes.addressof(prog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")

request = loads(stdin.read().decode())
devnull = os.open(os.devnull, os.O_RDONLY)
os.dup2(devnull, 0)
os.close(devnull)
sys.path.extend(setup["paths"])
os.chdir(scratch)

class Output:
    """sys.stdout and sys.stderr for the user's code: keeps the first `limit` characters."""
    encoding = "utf-8"
    errors = "replace"
    def __init__(self, limit):
        self.parts, self.size, self.limit, self.dropped = [], 0, limit, 0
    def write(self, s):
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        room = self.limit - self.size
        if room > 0:
            self.parts.append(s[:room])
            self.size += min(len(s), room)
        self.dropped += max(0, len(s) - max(room, 0))
        return len(s)
    def flush(self):
        pass
    def isatty(self):
        return False
    def writable(self):
        return True
    def text(self):
        return "".join(self.parts) + (f"\n[{self.dropped} more characters not kept]" if self.dropped else "")

output = Output(limits["output"])

# The audit hook: the last line, for when the kernel's layers are missing. event -> (indices of
# the paths it changes, indices of their directory descriptors), as CPython's audit table has them.
CHANGES = {
    "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
    "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)), "os.utime": ((0,), (3,)),
    "os.truncate": ((0,), ()), "os.chflags": ((0,), ()), "os.lchflags": ((0,), ()),
    "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()),
    "os.rename": ((0, 1), (2, 3)), "os.link": ((0, 1), (2, 3)), "os.symlink": ((1,), (2,)),
}
REFUSED = {
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill",
    "os.killpg", "pty.spawn", "resource.setrlimit", "resource.prlimit", "subprocess.Popen",
}
# ctypes is allowed (numpy imports it); looking these C functions up through it is not.
REFUSED_SYMBOLS = {
    "fork", "vfork", "_Fork", "clone", "clone3", "__clone", "syscall", "system", "popen",
    "posix_spawn", "posix_spawnp", "execv", "execve", "execvp", "execvpe", "execl", "execle",
    "execlp", "fexecve", "socket", "connect", "bind", "sendto", "sendmsg", "open", "open64",
    "openat", "openat64", "creat", "creat64", "fopen", "fopen64", "freopen", "freopen64",
    "unlink", "unlinkat", "rename", "renameat", "renameat2", "mkdir", "mkdirat", "rmdir",
    "truncate", "truncate64", "chmod", "fchmod", "fchmodat", "chown", "fchown", "lchown",
    "fchownat", "symlink", "symlinkat", "link", "linkat", "kill", "tgkill", "ptrace", "mount",
    "unshare", "setns", "prctl", "setrlimit", "prlimit", "prlimit64", "dlopen", "dlsym",
    "dlvsym", "dlmopen",
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

def where(path, dir_fd=None, _readlink=os.readlink, _join=os.path.join, _realpath=os.path.realpath,
          _fsdecode=os.fsdecode):
    if isinstance(path, int):
        return _readlink(f"/proc/self/fd/{path}")
    path = _fsdecode(path)
    if dir_fd is not None and dir_fd >= 0 and not path.startswith("/"):  # -1: the working folder
        path = _join(_readlink(f"/proc/self/fd/{dir_fd}"), path)
    return _realpath(path)

def hook(event, args, _scratch=scratch + "/", _where=where, _changes=CHANGES, _refused=REFUSED,
         _symbols=REFUSED_SYMBOLS):
    if event == "open":
        path, mode, flags = args
        if isinstance(path, int) or not ((mode and any(c in mode for c in "wax+")) or flags & WRITE_FLAGS):
            return  # reading, or a descriptor already open
        changed = [(path, None)]
    elif event in _changes:
        paths, dir_fds = _changes[event]
        changed = [(args[i], args[dir_fds[n]] if dir_fds else None) for n, i in enumerate(paths)]
        if event == "os.truncate" and isinstance(args[0], int):
            return  # ftruncate needs a descriptor open for writing, which `open` checked
    elif event in _refused or event.startswith("socket."):
        raise PermissionError(f"sandbox: {event} is not allowed in a grader")
    elif event in ("ctypes.dlsym", "ctypes.dlsym/handle"):
        name = args[1]
        if (name.decode(errors="replace") if isinstance(name, bytes) else name) in _symbols:
            raise PermissionError(f"sandbox: calling {name} through ctypes is not allowed in a grader")
        return
    elif event == "import" and args[0] == "_posixsubprocess":
        raise PermissionError("sandbox: _posixsubprocess is not allowed in a grader")
    else:
        return
    for path, dir_fd in changed:
        try:
            real = _where(path, dir_fd)
        except OSError:
            real = "?"
        if real != "/dev/null" and not (real + "/").startswith(_scratch):
            raise PermissionError(f"sandbox: changing {path!r} is not allowed (only under {_scratch[:-1]})")

R.setrlimit(R.RLIMIT_AS, (limits["memory"], limits["memory"]))
if setup["audit_hook"]:
    try:
        import _posixsubprocess
        def refuse(*args, **kwargs):
            raise PermissionError("sandbox: starting processes is not allowed in a grader")
        _posixsubprocess.fork_exec = refuse  # it raises no audit event of its own
    except ImportError:
        pass
    sys.addaudithook(hook)

def describe(exc):
    import linecache, traceback
    linecache.cache["<grader>"] = (len(request["source"]), None, request["source"].splitlines(True), "<grader>")
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != "<grader>":
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))[-4096:]

sys.stdout = sys.stderr = output
try:
    namespace = {"__name__": "__grader__", "__builtins__": __builtins__}
    exec(compile(request["source"], "<grader>", "exec", dont_inherit=True), namespace)
    grade = namespace.get("grade")
    if not callable(grade):
        result = {"error_type": "runtime", "details": "the source defines no function grade(sample, item)"}
    else:
        score = grade(request["sample"], request["item"])
        if isinstance(score, bool) or not isinstance(score, (int, float)) and not (
            hasattr(score, "__float__") and type(score).__module__ == "numpy" and "bool" not in type(score).__name__
        ):
            result = {"error_type": "invalid_return",
                      "details": f"grade() must return a number, got {type(score).__name__}"}
        else:
            score = float(score)
            if score != score or score in (float("inf"), float("-inf")):
                result = {"error_type": "invalid_return", "details": f"grade() returned {score}, not a finite number"}
            else:
                result = {"score": score}
except MemoryError:
    result = {"error_type": "memory", "details": f"grade() ran out of memory (limit {limits['memory'] >> 20} MB)"}
except BaseException as exc:
    try:
        details = describe(exc)
    except BaseException:
        details = f"{type(exc).__name__}: {exc}"
    result = {"error_type": "runtime", "details": details}
result["output"] = output.text()
answer(result)
'''
