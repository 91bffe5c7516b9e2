"""Code reward and sandbox: correctness cases, then attacks run side by side with a good program.

Every attack is scored by the public `code` reward through the RewardRunner, in parallel with
a correct program: each attack scores 0, the correct one 1, and the host sees none of it.
"""

import os
import socket
import threading
import time
import uuid

import pytest

from r1jax.config import RewardFnConfig, RewardsConfig
from r1jax.rewards import RewardRunner, code, extract_program
from r1jax.rewards.code import get_sandbox, parse_tests
from r1jax.rewards.sandbox import Limits, Sandbox


def fence(src: str) -> str:
    return f"<think>let me write it</think>\n```python\n{src}\n```\n"


SQUARE = "n = int(input())\nprint(n * n)"
IO_TESTS = [{"input": "3\n", "output": "9\n"}, {"input": "2", "output": "4"},
            {"input": "-5\n", "output": "25"}]


@pytest.fixture(scope="module")
def isolation():
    iso = get_sandbox().isolation
    if iso not in ("namespaces", "userns"):
        pytest.skip(f"attack tests need Linux namespaces (isolation here: {iso}); the rlimits "
                    "fallback does not contain them by design")
    return iso


def test_extract_program():
    assert extract_program("```python\na=1\n```\n```py\nb=2\n```") == "b=2\n"
    assert extract_program("```\nx=1\n```") == "x=1\n"
    assert extract_program("```bash\nls\n```") is None
    # Code inside the reasoning is a draft; only the answer part counts.
    assert extract_program("<think>```python\ndraft\n```</think>no code") is None
    assert extract_program("no code") is None


def test_parse_tests_formats():
    assert parse_tests(IO_TESTS)[0] == "io"
    assert parse_tests({"inputs": ["1"], "outputs": ["2"]}) == ("io", [("1", "2")])
    assert parse_tests('[{"input": "1", "output": "2"}]') == ("io", [("1", "2")])
    kind, (_, is_test) = parse_tests("import math\nassert f(1) == 1\ncheck(f)")
    assert kind == "asserts" and is_test == [False, True, True]
    with pytest.raises(ValueError, match="input"):
        parse_tests([{"in": "1"}])
    with pytest.raises(ValueError, match="parse"):
        parse_tests("assert (")


def test_code_cases(isolation):
    comps = [
        fence(SQUARE),  # correct
        fence("n = int(input())\nprint(n + n)"),  # right only for n = 2
        fence("n = int(input())\nprint(n * n)\nraise SystemExit(3)"),  # right output, crashes
        fence("import time\nn = int(input())\ntime.sleep(30)\nprint(n * n)"),  # too slow
        "I would square the number.",  # no code
        fence("def f(x):\n    return 2 * x"),  # asserts, all pass
        fence("def f(x):\n    return x + 2"),  # asserts: f(2) passes, f(3) fails
        fence("def f(x):\n    raise ValueError"),  # asserts: crashing function
        fence("import sys\nsys.exit(0)"),  # exits early to dodge the asserts: no pass
        fence("import os\ndef f(x):\n    os._exit(0)"),  # exits from inside a test
        fence("def add(a, b):\n    return a + b"),  # HumanEval-style check(candidate)
        fence(SQUARE),  # row without tests
    ]
    asserts = "assert f(2) == 4\nassert f(3) == 6"
    human_eval = "def check(candidate):\n    assert candidate(1, 2) == 3\n\ncheck(add)"
    tests = [IO_TESTS] * 5 + [asserts] * 5 + [human_eval, None]
    t0 = time.monotonic()
    got = code(comps, tests=tests, time_limit_s=1.0)
    assert got == [1.0, 1 / 3, 0.0, 0.0, 0.0, 1.0, 0.5, 0.0, 0.0, 0.0, 1.0, None]
    assert code(comps[1:2], tests=[IO_TESTS], mode="all") == [0.0]
    assert code(comps[:1], tests=[IO_TESTS], mode="all") == [1.0]
    assert time.monotonic() - t0 < 30


def test_stdout_cap_and_limits_reported(isolation):
    sb = Sandbox(Limits(wall_s=2, max_output_bytes=1000), isolation=isolation)
    r = sb.run("print('x' * 5000)", [""])[0]
    assert r.output_truncated and not r.ok and len(r.stdout) <= 1000
    r = sb.run("while True: pass", [""])[0]
    assert r.timed_out and r.wall_s < 4


ATTACKS = {
    "infinite_loop": ("while True:\n    pass", "x"),
    "sleep": ("import time\ntime.sleep(60)\nprint('x')", "x"),
    "fork_bomb": ("import os\nwhile True:\n    os.fork()", "x"),
    "thread_bomb": ("import threading, time\nwhile True:\n"
                    "    threading.Thread(target=time.sleep, args=(60,)).start()", "x"),
    "allocate_10GB": ("x = bytearray(10 * 1024 ** 3)\nprint('allocated')", "allocated"),
    "print_1GB": ("import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n"
                  "    sys.stdout.write(chunk)\nprint('done')", "done"),
    "fill_tmp": ("import os\nfor i in range(10 ** 6):\n    with open(f'/tmp/f{i}', 'w') as f:\n"
                 "        f.write('x' * 65536)\nprint('filled')", "filled"),
    "kill_parent": ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('x')",
                    "killed"),
    "kill_group_and_all": ("import os, signal\nfor pid in (0, -os.getpgid(os.getppid()), -1):\n"
                           "    try:\n        os.kill(pid, signal.SIGKILL)\n"
                           "    except OSError:\n        pass\nprint('x')", "killed"),
    "remount_chroot": ("import os\nos.chroot('/tmp')\nprint('escaped')", "escaped"),
}


def _attack_program(name, home, secret_path, secret, port, host_dir):
    extra = {
        "write_home": (f"for d in ({home!r}, '/root', '/home', '/tmp', {host_dir!r}):\n"
                       f"    try:\n        open(d + '/pwned-{{}}'.format(d.count('/')), 'w')"
                       f".write('x')\n    except OSError:\n        pass\n"
                       f"open({home!r} + '/pwned', 'w').write('x')\nprint('written')", "written"),
        "read_secret": (f"print(open({secret_path!r}).read())", secret),
        "read_home_secret": (f"print(open({home!r} + '/.r1jax-secret').read())", secret),
        "env_secret": ("import os\nprint(os.environ.get('R1JAX_TEST_SECRET'))", secret),
        "connect_localhost": (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}),"
                              f" timeout=1)\ns.sendall(b'hi')\nprint(s.recv(4).decode())", "pong"),
        "delete_host_files": (f"import shutil\nshutil.rmtree({host_dir!r})\nprint('deleted')",
                              "deleted"),
    }
    return {**ATTACKS, **extra}


def test_attacks_contained_and_others_unaffected(isolation, tmp_path, monkeypatch):
    secret = "s3cret-" + uuid.uuid4().hex
    secret_path = f"/tmp/r1jax-secret-{uuid.uuid4().hex}"
    with open(secret_path, "w") as f:
        f.write(secret)
    os.chmod(secret_path, 0o644)  # world-readable: only the jail's view of the files hides it
    home = os.path.expanduser("~")
    home_secret = os.path.join(home, ".r1jax-secret")
    home_had = os.path.exists(home_secret)
    if not home_had:
        with open(home_secret, "w") as f:
            f.write(secret)
    host_dir = str(tmp_path / "precious")
    os.makedirs(host_dir)
    open(host_dir + "/keep", "w").write("keep")
    monkeypatch.setenv("R1JAX_TEST_SECRET", secret)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    connections = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            connections.append(conn)
            conn.sendall(b"pong")

    listener = threading.Thread(target=serve, daemon=True)
    listener.start()
    try:
        attacks = _attack_program(None, home, secret_path, secret, port, host_dir)
        names = list(attacks) + ["good", "good_after"]
        comps = [fence(attacks[n][0]) for n in attacks] + [fence(SQUARE)] * 2
        tests = [[{"input": "", "output": attacks[n][1]}] for n in attacks] + [IO_TESTS] * 2
        cfg = RewardsConfig(functions=[RewardFnConfig(
            "code", kwargs={"time_limit_s": 2.0, "memory_mb": 512, "max_processes": 16})],
            num_workers=8, timeout_s=60)
        runner = RewardRunner(cfg)
        t0 = time.monotonic()
        res = runner.score(["p"] * len(comps), comps, [[0]] * len(comps),
                           [{"tests": t} for t in tests])
        elapsed = time.monotonic() - t0
        scores = dict(zip(names, res.per_function["code"].tolist()))
        assert scores.pop("good") == 1.0 and scores.pop("good_after") == 1.0, scores
        assert all(v == 0.0 for v in scores.values()), scores
        assert res.metrics["reward/code/errors"] == 0, res.metrics
        assert res.metrics["reward/code/timeouts"] == 0, res.metrics
        assert elapsed < 60
        assert not connections, "a sandboxed program reached a host socket"
        assert not os.path.exists(os.path.join(home, "pwned"))
        assert os.listdir(host_dir) == ["keep"]
        for d in ("/root", "/home", "/tmp"):
            assert not any(p.startswith("pwned") for p in os.listdir(d))
        # The host and the sandbox still work afterwards.
        assert code([fence(SQUARE)], tests=[IO_TESTS]) == [1.0]
    finally:
        stop.set()
        server.close()
        os.unlink(secret_path)
        if not home_had:
            os.unlink(home_secret)


def test_daemon_does_not_outlive_the_run(isolation):
    if isolation != "namespaces":
        pytest.skip("the program's uid is only unique (and visible to the host) as root")
    prog = ("import os, time, sys\nprint(os.getuid(), flush=True)\n"
            "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            "        time.sleep(60)\n    os._exit(0)\n")
    r = Sandbox(Limits(wall_s=3), isolation=isolation).run(prog, [""])[0]
    uid = int(r.stdout.split()[0])
    time.sleep(0.2)
    owners = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            owners.append(os.stat(f"/proc/{pid}").st_uid)
        except FileNotFoundError:
            pass
    assert uid not in owners


@pytest.mark.parametrize("level", ["namespaces", "userns", "rlimits"])
def test_each_isolation_level(level, tmp_path):
    """Every level runs programs and enforces the limits; the jailed levels also hide files."""
    from r1jax.rewards.sandbox import probe

    python = None
    if level == "rlimits" and os.getuid() == 0:
        # As root the fallback switches to a throwaway uid, which must be able to run Python.
        python = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3")
                       if os.path.exists(p)), None)
        if python is None:
            pytest.skip("no world-readable Python for the rlimits fallback as root")
    elif probe(level) is not None:
        pytest.skip(f"{level} unavailable here: {probe(level)}")
    sb = Sandbox(Limits(wall_s=1.5, memory_mb=256), isolation=level, python=python)
    secret = tmp_path / "secret"
    secret.write_text("hidden")
    secret.chmod(0o644)
    progs = ["print(int(input()) * 2)", "while True: pass", "x = bytearray(2 * 1024 ** 3)",
             f"print(open({str(secret)!r}).read())"]
    res = [sb.run(p, ["21"])[0] for p in progs]
    assert res[0].ok and res[0].stdout.strip() == "42"
    assert res[1].timed_out
    assert res[2].returncode != 0 and "MemoryError" in res[2].stderr
    if level != "rlimits":
        assert not res[3].ok and "hidden" not in res[3].stdout
    asserts = sb.run_asserts("def f(x):\n    return x + 1",
                             ["assert f(1) == 2", "assert f(1) == 3"])
    assert asserts.asserts == [True, False]


HE_PROMPT = 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum of xs."""\n'
HE_TESTS = "def check(candidate):\n    assert candidate([1, 2]) == 3\n    assert candidate([]) == 0\n\ncheck(total)\n"


def test_humaneval_program_body_or_whole_function():
    from r1jax.rewards.code import humaneval_program

    body = humaneval_program("    return sum(xs)\n", HE_PROMPT, "total")
    assert body == HE_PROMPT + "    return sum(xs)\n"
    flush_left = humaneval_program("return sum(xs)", HE_PROMPT, "total")
    assert flush_left.endswith("    return sum(xs)")
    whole = humaneval_program("```python\ndef total(xs):\n    return sum(xs)\n```", HE_PROMPT, "total")
    assert whole.startswith(HE_PROMPT.rstrip()) and whole.endswith("def total(xs):\n    return sum(xs)\n")
    # Code inside the reasoning is a draft.
    assert humaneval_program("<think>def total(xs): return 0</think>    return sum(xs)", HE_PROMPT,
                             "total").endswith("    return sum(xs)")


def test_humaneval_rows_scored(isolation):
    kw = dict(tests=[HE_TESTS] * 4, code_prompt=[HE_PROMPT] * 4, entry_point=["total"] * 4, mode="all")
    got = code(["    return sum(xs)\n", "```python\ndef total(xs):\n    return sum(xs)\n```",
                "    return len(xs)\n", "I cannot do that."], **kw)
    assert got == [1.0, 1.0, 0.0, 0.0]
