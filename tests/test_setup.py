"""The README's gunicorn commands, run as written from the repository's root in a shell without the virtualenv
(after `make install`, as `make test` runs): the sandbox, then each server, then the two curl requests; and
examples/gunicorn.conf.py removing, when the master exits, the metrics directory it made (and only that one)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SANDBOX_PORT = "8089"  # as the README writes it; the test runs it on a free port
SERVER = "localhost:8000"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Commands:
    sandbox: list[str]
    servers: dict[str, list[str]]  # "wsgi" / "asgi" -> argv
    curls: list[list[str]]


def readme_commands() -> Commands:
    """The shell block of the README that runs the examples under gunicorn, split as a shell would."""
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), re.S)
    (block,) = [b for b in blocks if "gunicorn -c examples/gunicorn.conf.py" in b]
    lines = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
    sandbox = [argv for argv in lines if "router.sandbox" in argv]
    servers = [argv for argv in lines if any(a.endswith("gunicorn") for a in argv[:1])]
    curls = [argv for argv in lines if argv[0] == "curl"]
    assert len(sandbox) == 1 and len(servers) == 2 and len(curls) == 2 and len(lines) == 5, block
    return Commands(
        sandbox=sandbox[0],
        servers={"asgi" if "uvicorn_worker.UvicornWorker" in argv else "wsgi": argv for argv in servers},
        curls=curls,
    )


def test_every_command_runs_from_the_clone_without_an_activated_virtualenv() -> None:
    cmds = readme_commands()
    for argv in [cmds.sandbox, *cmds.servers.values()]:
        program = ROOT / argv[0]
        assert argv[0].startswith(".venv/bin/") and program.exists() and os.access(program, os.X_OK), argv
    assert cmds.sandbox[-1] == "&"  # in the background: the servers come next in the same shell
    assert set(cmds.servers) == {"wsgi", "asgi"}


def bare_env(tmp: Path, **extra: str) -> dict[str, str]:
    """A login shell's environment: no virtualenv on PATH, no PROMETHEUS_MULTIPROC_DIR, no proxy."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp), "TMPDIR": str(tmp), "LANG": "C.UTF-8"}
    env.update(extra)
    return env


def curl(argv: list[str], port: int) -> str:
    """What `curl -s URL [-H header] [-d data] [| grep WORD]` prints (urllib: curl may not be installed)."""
    url, headers, data, grep = "", {}, None, None
    it = iter(argv[1:])
    for a in it:
        if a == "-s":
            continue
        if a == "-H":
            name, _, value = next(it).partition(":")
            headers[name.strip()] = value.strip()
        elif a == "-d":
            data = next(it).encode()
        elif a == "|":
            assert next(it) == "grep"
            grep = next(it)
        else:
            url = a
    assert url.startswith(SERVER), argv
    request = urllib.request.Request(f"http://127.0.0.1:{port}{url[len(SERVER) :]}", data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=30) as resp:
        text: str = resp.read().decode()
    return "\n".join(line for line in text.splitlines() if grep in line) if grep else text


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[int]:
    argv = readme_commands().sandbox[:-1]  # less the `&`: this process keeps the handle
    port = free_port()
    proc = subprocess.Popen(
        [str(port) if a == SANDBOX_PORT else a for a in argv],
        cwd=ROOT,
        env=bare_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "the sandbox did not start"
                time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def serves(port: int) -> bool:
    try:
        curl(["curl", "-s", f"{SERVER}/metrics"], port)
    except (OSError, urllib.error.URLError):
        return False
    return True


def alive(pid: int) -> bool:
    """Whether a process that is not our child runs (a zombie left to an init that does not reap: no)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the master and wait; if it hangs, kill the session it leads (its workers)."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        pytest.fail("the gunicorn master did not exit within 30 s of SIGTERM")


@pytest.mark.parametrize("kind", ["wsgi", "asgi"])
def test_the_readme_gunicorn_commands_serve_as_written_and_leave_no_metrics_directory(
    kind: str, sandbox: int, tmp_path: Path
) -> None:
    cmds = readme_commands()
    port = free_port()
    extra = {
        "BIND": f"127.0.0.1:{port}",
        "WEB_CONCURRENCY": "2",
        "LLM_ROUTER_SANDBOX_URL": f"http://127.0.0.1:{sandbox}",
    }
    given = tmp_path / "given-metrics"
    if kind == "asgi":  # a directory given by the environment is the operator's: emptied at start, kept at exit
        given.mkdir()
        (given / "counter_999.db").write_bytes(b"a previous run's")
        extra["PROMETHEUS_MULTIPROC_DIR"] = str(given)
    log = (tmp_path / "gunicorn.log").open("wb")
    proc = subprocess.Popen(
        cmds.servers[kind],
        cwd=ROOT,
        env=bare_env(tmp_path, **extra),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while not serves(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"gunicorn did not serve:\n{(tmp_path / 'gunicorn.log').read_text()[-3000:]}")
            time.sleep(0.2)
        made = sorted(tmp_path.glob("llm-router-metrics-*"))
        assert len(made) == (0 if kind == "asgi" else 1), made
        answer = json.loads(curl(cmds.curls[0], port))
        assert answer["provider"] == "fast" and answer["text"].startswith("[simulated "), answer
        lines = curl(cmds.curls[1], port).splitlines()
        assert any('alias="fast"' in line and 'outcome="success"' in line for line in lines), lines
    finally:
        stop(proc)
        log.close()
    assert proc.returncode == 0, (tmp_path / "gunicorn.log").read_text()[-3000:]
    assert sorted(tmp_path.glob("llm-router-metrics-*")) == []  # the directory it made is gone with the master
    if kind == "asgi":
        assert given.is_dir() and not (given / "counter_999.db").exists()


def test_after_a_binary_upgrade_each_master_removes_the_directory_it_made(sandbox: int, tmp_path: Path) -> None:
    """SIGUSR2 starts a new master with the environment gunicorn started with, so it makes a directory of its
    own: the old one, told to stop, removes only its own; the new one removes its own when it exits."""
    port = free_port()
    env = bare_env(
        tmp_path, BIND=f"127.0.0.1:{port}", WEB_CONCURRENCY="1", LLM_ROUTER_SANDBOX_URL=f"http://127.0.0.1:{sandbox}"
    )
    log = (tmp_path / "gunicorn.log").open("wb")
    old = subprocess.Popen(
        readme_commands().servers["wsgi"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    new_pid: int | None = None

    def listening() -> list[int]:  # the pid of each master that bound the socket, from gunicorn's log
        return [int(p) for p in re.findall(r"Listening at: \S+ \((\d+)\)", (tmp_path / "gunicorn.log").read_text())]

    def made() -> list[Path]:
        return sorted(tmp_path.glob("llm-router-metrics-*"), key=lambda p: p.stat().st_mtime)

    def wait_for(what: str, ok: Callable[[], bool], seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while not ok():
            if time.monotonic() > deadline:
                pytest.fail(f"{what}:\n{(tmp_path / 'gunicorn.log').read_text()[-3000:]}")
            time.sleep(0.2)

    try:
        wait_for("gunicorn did not serve", lambda: serves(port))  # its signal handlers are in place
        (first,) = made()
        old.send_signal(signal.SIGUSR2)
        wait_for("no new master", lambda: len(made()) == 2 and len(listening()) == 2)
        new_pid = listening()[-1]
        assert new_pid != old.pid
        stop(old)
        assert not first.exists()  # the old master removed its own directory, and only that one
        (second,) = made()
        assert serves(port)  # the new master's worker answers
        os.kill(new_pid, signal.SIGTERM)
        wait_for("the new master did not exit", lambda: not alive(new_pid), 30)
        new_pid = None
        assert not second.exists()
    finally:
        if old.poll() is None:
            stop(old)
        if new_pid is not None and alive(new_pid):
            os.kill(new_pid, signal.SIGKILL)
        log.close()
