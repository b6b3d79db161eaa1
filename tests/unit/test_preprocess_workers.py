"""``preprocess --workers N``: the same bytes as one process, the same errors, and no workers left
behind by a failure, Ctrl-C or a killed parent."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import megatron_lite
from megatron_lite.cli import main
from megatron_lite.data import preprocess as pp
from megatron_lite.data import preprocess_pool
from megatron_lite.data.corpus import default_corpus_files
from megatron_lite.data.preprocess_pool import EncodingPool, resolve_workers, usable_cpus
from megatron_lite.data.tokenizer import Tokenizer, train_tokenizer
from megatron_lite.errors import UserError

pytestmark = pytest.mark.usefixtures("enough_cpus")

VOCAB = 400
ROOT = Path(megatron_lite.__file__).parents[1]


@pytest.fixture(scope="module")
def code() -> str:
    files = [p for p in default_corpus_files() if 2_000 < p.stat().st_size < 12_000][:6]
    return "".join(p.read_text() for p in files)


@pytest.fixture(scope="module")
def tok(code, tmp_path_factory) -> Tokenizer:
    root = tmp_path_factory.mktemp("tok")
    (root / "a.txt").write_text(code + "unicode: héllo 世界 🙂\n")
    return Tokenizer(train_tokenizer([root / "a.txt"], root / "tok", VOCAB, progress=False))


def _corpus(code: str, root: Path) -> list[Path]:
    """JSONL with many documents (empty ones, long ones cut into pieces, invalid UTF-8, blank
    lines), a long text file, a gzipped JSONL and an empty file."""
    lines = []
    for i in range(300):
        text = "" if i % 7 == 0 else code[(i * 131) % 5000 :][: 40 + (i * 37) % 700]
        lines.append(json.dumps({"text": text}).encode())
        if i % 50 == 3:
            lines.append(json.dumps({"text": code * 2}).encode())  # ~100 pieces of 97 characters
            lines.append(b"")
    lines.append(b'{"text": "bad \xff utf-8"}')
    (root / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (root / "b.txt").write_text(code.replace("\n", " ") + "\n" + code)
    (root / "c.jsonl.gz").write_bytes(gzip.compress(b"\n".join(lines[:120]) + b"\n"))
    (root / "d.txt").write_bytes(b"")
    return [root / "a.jsonl", root / "b.txt", root / "c.jsonl.gz", root / "d.txt"]


def test_workers_write_the_same_bytes_as_one_process(tok, code, tmp_path, monkeypatch):
    monkeypatch.setattr(pp, "_PIECE_CHARS", 97)  # long documents in many pieces
    monkeypatch.setattr(pp, "_READ_BYTES", 7)
    monkeypatch.setattr(preprocess_pool, "_BATCH_CHARS", 300)  # many batches: the in-flight window fills
    monkeypatch.setattr(preprocess_pool, "_BATCH_ITEMS", 5)
    files = _corpus(code, tmp_path)
    one = pp.preprocess(files, tok, tmp_path / "one", progress=False)
    two = pp.preprocess(files, tok, tmp_path / "two", progress=False, workers=2)
    assert one["documents"] > 400 and one["decode_errors"] == 1
    assert {**one, "seconds": 0} == {**two, "seconds": 0}
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"one{ext}").read_bytes() == (tmp_path / f"two{ext}").read_bytes()
    records = [json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "two")]
    assert {**records[0], "seconds": 0} == {**records[1], "seconds": 0}


def test_the_parent_reads_ahead_only_a_bounded_window(tok, monkeypatch):
    """Memory holds one batch per worker and one more, however long the input (``Pool.imap`` reads it all)."""
    monkeypatch.setattr(preprocess_pool, "_BATCH_ITEMS", 4)
    read = 0

    def pieces():
        nonlocal read
        for _ in range(2_000):
            read += 1
            yield "x = 1"

    with EncodingPool(tok, 2) as pool:
        encoded = pool.encode(pieces())
        first = next(encoded)
        assert read == (2 + 1) * 4  # a batch of four pieces per worker, and the next sent before one is written
        assert [first.tolist(), *(ids.tolist() for ids in encoded)] == [tok.encode("x = 1")] * 2_000


def test_a_bad_json_line_is_the_same_error_and_leaves_no_outputs(tok, code, tmp_path, monkeypatch):
    monkeypatch.setattr(preprocess_pool, "_BATCH_CHARS", 300)
    good = tmp_path / "in" / "good.jsonl"
    good.parent.mkdir()
    good.write_text("".join(json.dumps({"text": code[i : i + 400]}) + "\n" for i in range(0, 8000, 400)))
    bad = tmp_path / "in" / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + '{"text": "cut off\n')
    out = tmp_path / "out"
    errors = []
    for workers in (1, 2):
        with pytest.raises(UserError) as e:
            pp.preprocess([good, bad], tok, out / "data", progress=False, workers=workers)
        errors.append(str(e.value))
    assert errors[0] == errors[1] and f"{bad}:2: invalid JSON" in errors[0]
    assert not out.exists() or list(out.iterdir()) == []  # nor any temporary file


@pytest.mark.parametrize("value", [0, -2, "0", "two", "1.5", ""])
def test_workers_below_one_are_refused(value):
    with pytest.raises(UserError, match="--workers .*1 or more.*auto"):
        resolve_workers(value)


def test_the_cli_refuses_workers_below_one_before_any_work(tok, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("x = 1\n")
    argv = ["preprocess", "--input", str(tmp_path / "a.txt"), "--tokenizer", str(tok.path)]
    assert main([*argv, "--output", str(tmp_path / "out"), "--workers", "0", "--quiet"]) == 2
    assert "error: --workers 0: give the number of tokenizing processes, 1 or more" in capsys.readouterr().err
    assert not list(tmp_path.glob("out*"))


def test_workers_auto_is_one_per_usable_cpu():
    affinity = len(os.sched_getaffinity(0))
    cpus = min(affinity, preprocess_pool.cgroup_cpu_quota() or affinity)  # this machine's quota, if any
    assert resolve_workers("auto") == cpus
    assert resolve_workers(str(cpus)) == resolve_workers(cpus) == cpus


@pytest.mark.parametrize(
    "cgroup,cpu_max,want",
    [
        ("0::/\n", "200000 100000\n", 2),  # docker --cpus=2: the container's cgroup is its root
        ("0::/kubepods/pod1/c1\n", "150000 100000\n", 2),  # a 1.5-CPU limit: rounded up
        ("0::/kubepods/pod1/c1\n", "max 100000\n", None),  # no quota
        ("4:memory:/x\n1:cpu:/\n", None, None),  # cgroup v1 only: not read
    ],
)
def test_a_cgroup_v2_cpu_quota_caps_the_usable_cpus(tmp_path, cgroup, cpu_max, want, monkeypatch):
    """A container given 2 CPUs of a 64-CPU host by quota (its affinity still lists all 64) uses 2:
    ``--workers auto`` and the CPU MFU peak count those, not the host's."""
    (tmp_path / "cgroup").write_text(cgroup)
    if cpu_max is not None:
        folder = tmp_path / "fs" / cgroup.strip()[3:].lstrip("/")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "cpu.max").write_text(cpu_max)
    quota = preprocess_pool.cgroup_cpu_quota(str(tmp_path / "cgroup"), str(tmp_path / "fs"))
    assert quota == want
    monkeypatch.setattr(preprocess_pool, "cgroup_cpu_quota", lambda: quota)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert usable_cpus() == (want or 64)  # the function itself (this module's runs patch the name)


def test_a_cpu_quota_on_an_ancestor_cgroup_caps_the_usable_cpus(tmp_path):
    """A systemd slice's CPUQuota (or a Kubernetes pod's limit) sits above the process's own cgroup,
    whose cpu.max says max: the lowest quota on the way up to the root binds."""
    (tmp_path / "cgroup").write_text("0::/limited.slice/job.scope\n")
    fs = tmp_path / "fs"
    (fs / "limited.slice" / "job.scope").mkdir(parents=True)
    (fs / "cpu.max").write_text("max 100000\n")
    (fs / "limited.slice" / "cpu.max").write_text("300000 100000\n")
    (fs / "limited.slice" / "job.scope" / "cpu.max").write_text("max 100000\n")
    assert preprocess_pool.cgroup_cpu_quota(str(tmp_path / "cgroup"), str(fs)) == 3
    (fs / "limited.slice" / "job.scope" / "cpu.max").write_text("100000 100000\n")  # the leaf lower still
    assert preprocess_pool.cgroup_cpu_quota(str(tmp_path / "cgroup"), str(fs)) == 1


def test_more_workers_than_usable_cpus_are_refused(tmp_path, tok, capsys):
    """--workers 100000 started processes until the machine ran out of memory."""
    cpus = len(os.sched_getaffinity(0))
    with pytest.raises(UserError, match=f"--workers {cpus + 1}: this process may run on {cpus} CPUs.*at most {cpus}"):
        resolve_workers(cpus + 1)
    (tmp_path / "a.txt").write_text("x = 1\n")
    argv = ["preprocess", "--input", str(tmp_path / "a.txt"), "--tokenizer", str(tok.path), "--quiet"]
    assert main([*argv, "--output", str(tmp_path / "out"), "--workers", "100000"]) == 2
    assert "error: --workers 100000: this process may run on" in capsys.readouterr().err
    assert not list(tmp_path.glob("out*"))


def test_a_worker_that_cannot_load_the_tokenizer_is_an_error_not_a_hang(tok, tmp_path):
    class Broken:
        path, model_bytes = tmp_path / "broken.model", b"not a model"

    with (
        pytest.raises(UserError, match="broken.model is not a valid sentencepiece model"),
        EncodingPool(Broken(), 2) as pool,
    ):
        list(pool.encode(["def f():", None]))


def test_workers_survive_a_ctrl_c_however_early(tok):
    """A Ctrl-C reaches every process of the group; a worker still starting up must not die of it
    (the parent alone reacts). Signalled at once, the workers are still importing modules."""
    with EncodingPool(tok, 2) as pool:
        for proc in pool._procs:
            os.kill(proc.pid, signal.SIGINT)
        assert [ids.tolist() for ids in pool.encode(["x = 1", "y"])] == [tok.encode("x = 1"), tok.encode("y")]


def test_a_worker_killed_mid_run_is_an_error_naming_it_not_a_hang(tok):
    died = r"worker 1 of --workers 2 .* ended unexpectedly \(killed by SIGKILL"
    with pytest.raises(UserError, match=died), EncodingPool(tok, 2) as pool:
        pool._procs[0].kill()  # as the out-of-memory killer would
        pool._procs[0].join()
        list(pool.encode(["x = 1"] * 10))


def _state(pid: int) -> str | None:
    """The process state letter of ``pid`` (``Z``: a zombie), None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2]


def _workers_of(parent: int) -> list[int]:
    """The spawned multiprocessing children of ``parent`` (not its resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == parent and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def _wait(condition, what: str, limit_s: float = 120.0):
    """Poll ``condition`` until it holds (a bound on a hang, not a timing claim)."""
    deadline = time.monotonic() + limit_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting for {what} after {limit_s} s")
        time.sleep(0.05)
    return value


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker processes in /proc (Linux)")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "parent-killed"])
def test_no_worker_outlives_an_interrupted_or_killed_run(tok, code, tmp_path, sig):
    # ~25 s of encoding per worker when idle, signalled within its first seconds: a pytest process held off
    # the CPU for seconds on a loaded machine must not find the run already finished
    (tmp_path / "big.txt").write_text(code * (100_000_000 // len(code)))
    out = tmp_path / "out"
    argv = ["-m", "megatron_lite.cli", "preprocess", "--workers", "2", "--quiet", "--input", str(tmp_path / "big.txt")]
    argv += ["--tokenizer", str(tok.path), "--output", str(out / "data")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.Popen([sys.executable, *argv], env=env, start_new_session=True, stderr=subprocess.PIPE, text=True)
    try:
        # ids flowing: both workers were started (a Ctrl-C inside the parent's start of a process,
        # before it can know the pid, is a race no code of ours can close: not what this tests)
        _wait(lambda: any(p.stat().st_size for p in out.glob(".data.bin.tmp-*")), "the first ids")
        workers = _workers_of(run.pid)
        assert len(workers) == 2
        if sig == signal.SIGINT:
            os.killpg(run.pid, sig)  # Ctrl-C signals the whole foreground process group
        else:
            os.kill(run.pid, sig)  # the parent alone (an out-of-memory kill): nothing of it runs again
        _, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    _wait(lambda: all(_state(pid) in (None, "Z") for pid in workers), "the workers to end")
    if sig == signal.SIGINT:
        assert run.returncode == 130 and stderr.strip() == "interrupted"  # no worker's traceback either
        assert not out.exists() or list(out.iterdir()) == []  # the temporary .bin was deleted
    else:  # its temporary .bin is left, until the next run to the same prefix
        assert len(list(out.glob(".data.bin.tmp-*"))) == 1
        (tmp_path / "small.txt").write_text(code[:500])
        pp.preprocess([tmp_path / "small.txt"], tok, out / "data", progress=False, workers=2)
        assert sorted(p.name for p in out.iterdir()) == ["data.bin", "data.idx", "data.json"]
