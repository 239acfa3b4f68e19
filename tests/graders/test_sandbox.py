"""The python graders' sandbox, run for real: every escape is tried against all layers together and
against each layer alone (bubblewrap, seccomp, the audit hook), and must fail wherever that layer
is meant to stop it."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from pathlib import Path

import pytest

from tunehouse.graders import sandbox
from tunehouse.graders.sandbox import (
    Limits,
    SandboxResult,
    _bwrap_problem,
    _run,
    _seccomp_program,
    _unshare_problem,
    check_source,
    run_python,
)

REPO = Path(__file__).resolve().parents[2]
LIMITS = Limits(cpu_seconds=2, wall_seconds=8, memory_mb=256, output_kb=8)


def run(source: str, sample: dict | None = None, item: dict | None = None, **kw) -> SandboxResult:
    return run_python(source, sample or {}, item or {}, limits=kw.pop("limits", LIMITS), **kw)


# --- check_source: compiled, never run --------------------------------------------------------------


def test_check_source_accepts_a_grader():
    assert check_source("def grade(sample, item):\n    return 1.0\n") is None
    assert check_source("def grade(sample, item, extra=None):\n    return 1.0\n") is None
    assert check_source("def grade(*args):\n    return 1.0\n") is None


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("def grade(sample, item)\n    return 1\n", "syntax error at line 1"),
        ("def grade(sample, item):\nreturn 1\n", "syntax error at line 2"),
        ("def other(sample, item):\n    return 1\n", "must define a top-level function grade"),
        ("class A:\n    def grade(self, sample, item):\n        return 1\n", "top-level function grade"),
        ("grade = lambda sample, item: 1\n", "top-level function grade"),
        ("def grade(sample):\n    return 1\n", "two arguments"),
        ("def grade(sample, item, label):\n    return 1\n", "two arguments"),
        ("def grade(sample, item, *, key):\n    return 1\n", "two arguments"),
        ("async def grade(sample, item):\n    return 1\n", "not async"),
        ("def grade(sample, item):\n    return 1\n\x00", "does not compile"),
    ],
)
def test_check_source_names_the_problem(source, problem):
    assert problem in (check_source(source) or "")


def test_check_source_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    source = f"open({str(marker)!r}, 'w').write('x')\ndef grade(sample, item):\n    return 1\n"
    assert check_source(source) is None
    assert not marker.exists()


# --- results --------------------------------------------------------------------------------------


def test_a_grader_returns_its_score():
    result = run("def grade(sample, item):\n    return 0.25\n")
    assert (result.score, result.error_type, result.details) == (0.25, None, None)
    assert result.execution_time > 0
    assert run("def grade(sample, item):\n    return 3\n").score == 3.0


def test_a_grader_reads_sample_and_item():
    source = """
def grade(sample, item):
    ok = sample["output_text"].strip() == item["label"] and sample["output_json"]["n"] == item["meta"]["n"]
    return 1.0 if ok and item["text"] == "héllo ✓" else 0.5
"""
    sample = {"output_text": " yes ", "output_json": {"n": 3}, "output_tools": [], "choices": []}
    item = {"label": "yes", "meta": {"n": 3}, "text": "héllo ✓"}
    assert run(source, sample, item).score == 1.0
    assert run(source, {**sample, "output_text": "no"}, item).score == 0.5


def test_a_large_item_goes_through():
    source = "def grade(sample, item):\n    return len(item['text']) / 1e6\n"
    assert run(source, item={"text": "x" * 3_000_000}).score == 3.0


def test_a_grader_may_import_installed_libraries():
    pytest.importorskip("numpy")
    source = "import numpy as np\ndef grade(sample, item):\n    return np.mean(np.array([1.0, 0.5]))\n"
    assert run(source).score == 0.75


def test_an_exception_is_a_runtime_error_with_its_message_and_line():
    source = "def grade(sample, item):\n    x = 1\n    raise ValueError('no label in ' + item['id'])\n"
    result = run(source, item={"id": "item-7"})
    assert result.score is None and result.error_type == "runtime"
    assert "ValueError: no label in item-7" in result.details
    assert 'File "<grader>", line 3, in grade' in result.details
    assert "raise ValueError" in result.details  # the user's source line, not the sandbox's code


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("def grade(sample, item)\n    return 1\n", "SyntaxError"),
        ("def other(sample, item):\n    return 1\n", "no function grade"),
        ("import sys\ndef grade(sample, item):\n    sys.exit(0)\n", "SystemExit"),
        ("import no_such_module_here\ndef grade(sample, item):\n    return 1\n", "ModuleNotFoundError"),
        ("def grade(sample, item):\n    return grade(sample, item)\n", "RecursionError"),
    ],
)
def test_other_failures_are_runtime_errors(source, needle):
    result = run(source)
    assert result.error_type == "runtime" and needle in result.details


@pytest.mark.parametrize(
    "value", ["None", "'1.0'", "True", "float('nan')", "float('inf')", "[1.0]", "{'score': 1}"]
)
def test_a_score_must_be_a_finite_number(value):
    result = run(f"def grade(sample, item):\n    return {value}\n")
    assert result.score is None and result.error_type == "invalid_return", result


def test_prints_do_not_disturb_the_answer():
    source = """
import os, sys
def grade(sample, item):
    print('{"score": 0.0}')
    for i in range(20000):
        print("x" * 100)
    sys.stderr.write("err\\n")
    os.write(1, b'{"score": 0.0}' * 10000)  # C-level writes to the real stdout
    os.write(2, b"y" * 100000)
    return 0.5
"""
    result = run(source)
    assert result.score == 0.5 and result.error_type is None
    assert result.output.startswith('{"score": 0.0}\nxxx')
    assert len(result.output) < 8 * 1024 + 100  # cut at output_kb
    assert "more characters not kept" in result.output


# --- limits ---------------------------------------------------------------------------------------


def test_an_endless_loop_times_out_on_cpu_time():
    result = run("def grade(sample, item):\n    while True:\n        pass\n", limits=Limits(cpu_seconds=1))
    assert result.score is None and result.error_type == "timeout"
    assert result.execution_time < Limits().wall_seconds


def test_a_sleeping_grader_times_out_on_the_wall_clock():
    source = "import time\ndef grade(sample, item):\n    time.sleep(60)\n    return 1\n"
    result = run(source, limits=Limits(cpu_seconds=5, wall_seconds=1))
    assert result.score is None and result.error_type == "timeout"
    assert "wall clock" in result.details
    assert result.execution_time < 10


def test_a_loop_in_c_code_is_killed_at_the_hard_cpu_limit():
    # One call into C that runs for hours: no bytecode boundary for a signal handler to run at.
    result = run("def grade(sample, item):\n    return sum(range(10 ** 14))\n", limits=Limits(cpu_seconds=1))
    assert result.score is None and result.error_type == "timeout"


@pytest.mark.parametrize(
    "body",
    [
        "x = bytearray(4 * 1024 ** 3)",
        "x = []\n    while True:\n        x.append(bytearray(10 ** 6))",
        "x = 'a' * (2 * 1024 ** 3)",
    ],
)
def test_too_much_memory_is_a_memory_error(body):
    result = run(f"def grade(sample, item):\n    {body}\n    return 1\n")
    assert result.score is None and result.error_type == "memory", result


def test_the_scratch_folder_holds_only_so_much():
    source = """
import os
def grade(sample, item):
    with open(os.path.join(os.getcwd(), "big"), "wb") as f:
        for _ in range(100):
            f.write(b"x" * 1024 * 1024)
    return 1
"""
    result = run(source)
    assert result.error_type == "runtime", result
    assert "File too large" in result.details or "No space left" in result.details


# --- escapes: each must fail with all layers, and with each layer meant to stop it alone ----------

ALL = "all layers"
BWRAP = "bubblewrap alone"
UNSHARE = "unshare alone"
SECCOMP = "seccomp alone"
HOOK = "audit hook alone"
LAYERS = {
    ALL: {},
    BWRAP: {"isolation": "bwrap", "use_seccomp": False, "audit_hook": False},
    UNSHARE: {"isolation": "unshare", "use_seccomp": False, "audit_hook": False},
    SECCOMP: {"isolation": "process", "use_seccomp": True, "audit_hook": False},
    HOOK: {"isolation": "process", "use_seccomp": False, "audit_hook": True},
}
NONE = {"isolation": "process", "use_seccomp": False, "audit_hook": False}


def available(layer: str) -> None:
    if layer == BWRAP and _bwrap_problem() is not None:
        pytest.skip(f"bubblewrap: {_bwrap_problem()}")
    if layer == UNSHARE and _unshare_problem() is not None:
        pytest.skip(f"unshare: {_unshare_problem()}")
    if layer == SECCOMP and _seccomp_program() is None:
        pytest.skip("no libseccomp here")


@pytest.fixture
def listener():
    """A TCP server on 127.0.0.1 that a grader must not reach."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    yield server
    server.close()


def connected(server: socket.socket) -> bool:
    try:
        server.accept()[0].close()
    except TimeoutError:
        return False
    return True


FORK = """
import os
def grade(sample, item):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return 1.0
"""
CTYPES_FORK = """
import ctypes
def grade(sample, item):
    libc = ctypes.CDLL(None, use_errno=True)
    pid = libc.fork()
    if pid == 0:
        libc._exit(0)
    if pid < 0:
        raise OSError(ctypes.get_errno(), "fork failed")
    return 1.0
"""
SUBPROCESS = """
import subprocess
def grade(sample, item):
    subprocess.run(["/bin/true"], check=True)
    return 1.0
"""
CONNECT = """
import socket
def grade(sample, item):
    socket.create_connection(("127.0.0.1", item["port"]), timeout=2).close()
    return 1.0
"""
WRITE = """
def grade(sample, item):
    with open(item["path"], "w") as f:
        f.write("escaped")
    return 1.0
"""


@pytest.mark.parametrize("layer", [ALL, BWRAP, SECCOMP, HOOK])
@pytest.mark.parametrize("source", [FORK, CTYPES_FORK, SUBPROCESS], ids=["os.fork", "ctypes", "subprocess"])
def test_no_new_process(layer, source):
    available(layer)
    result = _run(source, {}, {}, limits=LIMITS, **LAYERS[layer])
    assert result.score is None and result.error_type == "runtime", result


@pytest.mark.parametrize("layer", [ALL, BWRAP, UNSHARE, SECCOMP, HOOK])
def test_no_network(layer, listener):
    available(layer)
    result = _run(CONNECT, {}, {"port": listener.getsockname()[1]}, limits=LIMITS, **LAYERS[layer])
    assert result.score is None and result.error_type == "runtime", result
    assert not connected(listener)


@pytest.mark.parametrize("layer", [ALL, BWRAP, UNSHARE, SECCOMP, HOOK])
def test_no_postgresql(layer):
    available(layer)
    with socket.socket() as s:
        s.settimeout(1)
        if s.connect_ex(("127.0.0.1", 5432)) != 0:
            pytest.skip("nothing listens on 127.0.0.1:5432 here")
    result = _run(CONNECT, {}, {"port": 5432}, limits=LIMITS, **LAYERS[layer])
    assert result.score is None and result.error_type == "runtime", result


@pytest.mark.parametrize("layer", [ALL, BWRAP, HOOK])  # seccomp does not look at files
@pytest.mark.parametrize("where", ["project", "work", "tmp"])
def test_no_writes_outside_the_scratch_folder(layer, where, tmp_path):
    available(layer)
    name = f"escape-{uuid.uuid4().hex}.txt"
    target = {"project": REPO / name, "work": REPO.parent / name, "tmp": tmp_path / name}[where]
    try:
        result = _run(WRITE, {}, {"path": str(target)}, limits=LIMITS, **LAYERS[layer])
        assert result.score is None and result.error_type == "runtime", result
        assert not target.exists()
    finally:
        target.unlink(missing_ok=True)


@pytest.mark.parametrize("layer", [ALL, BWRAP, UNSHARE, SECCOMP, HOOK])
def test_the_scratch_folder_is_writable_and_the_system_readable(layer):
    available(layer)
    source = """
import os
def grade(sample, item):
    path = os.path.join(os.environ["TMPDIR"], "notes", "a.txt")
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write("kept")
    os.rename(path, path + ".old")
    with open(path + ".old") as f:
        assert f.read() == "kept"
    with open("/etc/hostname") as f:
        return 1.0 if f.read() == item["hostname"] else 0.5
"""
    hostname = Path("/etc/hostname").read_text()
    result = _run(source, {}, {"hostname": hostname}, limits=LIMITS, **LAYERS[layer])
    assert result.score == 1.0, result


def test_without_any_layer_these_escapes_succeed(listener, tmp_path):
    """The escape tests above try real escapes: with every layer off they get through."""
    target = tmp_path / "escaped.txt"
    for source, item in [
        (FORK, {}),
        (CONNECT, {"port": listener.getsockname()[1]}),
        (WRITE, {"path": str(target)}),
    ]:
        assert _run(source, {}, item, limits=LIMITS, **NONE).score == 1.0
    assert connected(listener)
    assert target.read_text() == "escaped"


def test_a_missing_layer_is_logged_once_and_the_rest_still_hold(monkeypatch, caplog, listener):
    """Where neither bwrap nor unshare can be found, graders still run, with a warning each, once."""
    probes = (sandbox._bwrap_problem, sandbox._unshare_problem)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(sandbox, "_warned", set())
    for probe in probes:
        probe.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=sandbox.__name__):
            assert run("def grade(sample, item):\n    return 1\n").score == 1.0
            blocked = run(CONNECT, item={"port": listener.getsockname()[1]})
    finally:
        for probe in probes:
            probe.cache_clear()
    assert blocked.error_type == "runtime" and not connected(listener)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings
    assert "without bubblewrap (bwrap is not installed)" in warnings[0]
    assert "without a network namespace (unshare is not installed)" in warnings[1]


@pytest.mark.skipif(not os.environ.get("CI"), reason="CI installs bubblewrap through scripts/setup.sh")
def test_ci_has_every_layer():
    assert _bwrap_problem() is None
    assert _seccomp_program() is not None


# --- the parent ------------------------------------------------------------------------------------


def children() -> set[int]:
    me = str(os.getpid())
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[1] == me:
                found.add(int(entry))
    return found


def test_the_parent_is_unaffected_by_many_calls():
    cwd, env, fds, kids = os.getcwd(), dict(os.environ), len(os.listdir("/proc/self/fd")), children()
    hostile = (
        "import os\nos.chdir('/')\nos.environ['X'] = '1'\ndef grade(sample, item):\n    return item['i']\n"
    )
    endless = "def grade(sample, item):\n    while True: pass\n"
    for i in range(15):
        assert run(hostile, item={"i": i}).score == i
        if i % 5 == 0:
            assert run(endless, limits=Limits(wall_seconds=0.3)).error_type == "timeout"
    assert (os.getcwd(), dict(os.environ)) == (cwd, env)
    assert len(os.listdir("/proc/self/fd")) == fds  # no descriptor leaks
    assert children() == kids  # every child reaped, none left running


def test_calls_from_many_threads_keep_their_own_results():
    source = "def grade(sample, item):\n    return item['i'] * 2\n"
    results: dict[int, SandboxResult] = {}

    def work(i: int) -> None:
        results[i] = run(source, item={"i": i})

    threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {i: r.score for i, r in results.items()} == {i: i * 2.0 for i in range(12)}
