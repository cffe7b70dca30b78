"""No run is lost: the run folder's lock, checkpoint checksums, leftovers and resume rules
(dxtrain/lock.py, dxtrain/rundir.py, the set-up in dxtrain/train.py, ``train`` in dxtrain/cli.py).

Covered:

* one run per folder: a second ``dxtrain train`` (fresh or ``--resume``) beside a live one is
  refused with exit 1, naming the folder and the holder (pid, host), and changes nothing; a lock
  left by a ``kill -9`` is taken over (and said so); the lock file goes at the end;
* checkpoints carry a SHA-256 sidecar and the one before is kept as ``checkpoint.prev.pt``;
  a flipped byte, a truncated, empty or random-bytes ``checkpoint.pt`` is refused by name by
  ``sample`` and ``eval``, and ``--resume`` falls back to the previous checkpoint (continuing
  bit-identically from it); with nothing intact left, a clear error; an old checkpoint without
  a sidecar still loads, with a note;
* leftovers: temporary files of interrupted writes are removed at start, a fresh run starts
  ``metrics.jsonl`` empty;
* ``--resume`` refuses changed settings by name, accepts and announces the safe ones, and
  takes the options left out from the checkpoint; the library's ``given=``.

Tiny runs (moons, exact field, batch 40, CPU), in-process through ``CliRunner`` except where a
second live process is the point.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import dxtrain  # noqa: F401  (before torch: the sleep-waiting thread pools)
from helpers import assert_refused, describe

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

import dxtrain.train as dx_train  # noqa: E402
from dxtrain.cli import main  # noqa: E402
from dxtrain.lock import LOCK, RunFolderBusy, RunLock  # noqa: E402

posix = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and fcntl")

FAST = ["--field", "exact", "--batch", "40", "--positives", "60", "--landmarks", "8", "--log-every", "2",
        "--sample-every", "3", "--checkpoint-every", "3", "--no-eval", "--no-progress", "--device", "cpu",
        "--encoder", "none"]
DAMAGE = {
    "flipped-byte": lambda b: b[:len(b) // 2] + bytes([b[len(b) // 2] ^ 0x40]) + b[len(b) // 2 + 1:],
    "truncated": lambda b: b[:len(b) // 2],
    "empty": lambda b: b"",
    "random-bytes": lambda b: bytes((i * 7919 + 13) % 251 for i in range(len(b))),
}
REASON = {"flipped-byte": "does not match its checksum", "truncated": "does not match its checksum",
          "empty": "is empty", "random-bytes": "does not match its checksum"}


# --------------------------------------------------------------------------- helpers


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def train(out, *extra, steps=6, ok=True):
    result = invoke("train", "--data", "moons", "--out", out, "--steps", steps, *FAST, *extra)
    if ok:
        assert result.exit_code == 0, describe(result)
    return result






def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def metrics_steps(run):
    with open(os.path.join(run, "metrics.jsonl")) as fh:
        return [json.loads(line)["step"] for line in fh if line.strip()]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def verifies(path):
    """Whether ``path``'s sidecar (``<name>.sha256``) holds its SHA-256, as ``sha256sum -c`` checks it."""
    sidecar = os.path.splitext(path)[0] + ".sha256"
    with open(path, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    with open(sidecar) as fh:
        lines = [line.split() for line in fh if line.strip()]
    return lines == [[digest, os.path.basename(path)]]


def copy_run(src, tmp_path, name="run"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def damage(path, how):
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(DAMAGE[how](data))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """moons, exact field, 6 steps: checkpoint.pt at step 6, checkpoint.prev.pt at step 3."""
    out = tmp_path_factory.mktemp("base") / "run"
    train(out)
    return out


@pytest.fixture(scope="module")
def straight9(tmp_path_factory):
    """The same settings, 9 steps in one go."""
    out = tmp_path_factory.mktemp("straight9") / "run"
    train(out, steps=9)
    return out


def start_training(tmp_path, out, *extra):
    """A real ``dxtrain train`` process on moons that runs until stopped."""
    cmd = [sys.executable, "-m", "dxtrain", "train", "--data", "moons", "--out", str(out), "--steps", "1000000",
           *FAST, *extra]
    log = open(tmp_path / "proc.stderr", "wb")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, cwd=tmp_path,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    log.close()
    return proc


def wait_for(proc, tmp_path, ready, what, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen (exit {proc.poll()}): " + (tmp_path / "proc.stderr").read_text())


def stop(proc):
    if proc.poll() is None:  # only the process this test started
        proc.kill()
        proc.wait()


HOLDER = ("import sys, time\nfrom dxtrain.lock import RunLock\nwith RunLock(sys.argv[1]):\n"
          "    print('held', flush=True)\n    time.sleep(600)\n")


def hold_lock(folder):
    """A helper process holding ``folder``'s lock (until killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


# --------------------------------------------------------------------------- 1. one run per folder


@posix
def test_second_run_beside_a_live_one_is_refused(tmp_path):
    out = tmp_path / "run"
    proc = start_training(tmp_path, out, "--checkpoint-every", "100000", "--sample-every", "100000")
    try:
        wait_for(proc, tmp_path, lambda: (out / "metrics.jsonl").exists()
                 and len((out / "metrics.jsonl").read_text().splitlines()) >= 2, "first metrics")
        for extra in ([], ["--resume"]):
            result = train(out, *extra, ok=False)
            assert_refused(result, str(out), "in use by another dxtrain run", f"pid {proc.pid}",
                           socket.gethostname(), "--out")
        assert proc.poll() is None, "the first run must live on"
        steps = metrics_steps(out)
        assert steps == sorted(set(steps)), steps  # no line written twice
        assert not (out / "checkpoint.pt").exists()  # the refused runs wrote nothing
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 130
    finally:
        stop(proc)
    assert load(out / "checkpoint.pt")["step"] > 0
    assert not (out / LOCK).exists()  # released


def test_refused_run_changes_nothing(base, tmp_path):
    out = copy_run(base, tmp_path)
    before = {p: (out / p).read_bytes() for p in ("checkpoint.pt", "checkpoint.prev.pt", "metrics.jsonl",
                                                  "config.json")}
    (out / "checkpoint.pt.0000abcd.tmp").write_bytes(b"x")
    proc = hold_lock(out)
    try:
        result = train(out, "--resume", steps=9, ok=False)
    finally:
        stop(proc)
    assert_refused(result, str(out), f"pid {proc.pid}", "in use")
    assert {p: (out / p).read_bytes() for p in before} == before
    assert (out / "checkpoint.pt.0000abcd.tmp").exists()  # not even the leftovers: the holder may be writing


@posix
def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    out = tmp_path / "run"
    proc = hold_lock(out)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((out / LOCK).read_text())["pid"] == proc.pid  # the dead holder's file is still there
    result = train(out)
    assert "taking over the lock" in result.stderr and f"pid {proc.pid}" in result.stderr
    assert load(out / "checkpoint.pt")["step"] == 6
    assert not (out / LOCK).exists()


@posix
def test_training_killed_mid_run_resumes(tmp_path):
    """kill -9 of a real run: its lock is taken over, a half-written checkpoint's temp file removed,
    and the run continues from its checkpoint."""
    out = tmp_path / "run"
    proc = start_training(tmp_path, out, "--checkpoint-every", "2")
    try:
        wait_for(proc, tmp_path, lambda: (out / "checkpoint.prev.pt").exists(), "two checkpoints")
        proc.kill()  # SIGKILL: no handler runs
        proc.wait()
    finally:
        stop(proc)
    (out / "checkpoint.pt.k9abcdef.tmp").write_bytes(b"PK\x03\x04" + b"\0" * 100)  # a write cut by the kill
    step = load(out / "checkpoint.pt")["step"]
    result = train(out, "--resume", "--checkpoint-every", "2", steps=step + 2)
    assert "taking over the lock" in result.stderr
    # (the kill may have cut a real write too: then its temp file goes as well)
    assert re.search(r"removed \d+ temporary file", result.stderr) and "checkpoint.pt.k9abcdef.tmp" in result.stderr
    assert f"at step {step}" in result.stderr
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    assert load(out / "checkpoint.pt")["step"] == step + 2
    steps = metrics_steps(out)
    assert steps == sorted(set(steps)) and steps[-1] == step + 2


def test_lock_in_one_process_refuses_a_second_holder(tmp_path):
    with RunLock(str(tmp_path / "run")):
        info = json.loads((tmp_path / "run" / LOCK).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        with pytest.raises(RunFolderBusy, match=f"pid {os.getpid()}"):
            RunLock(str(tmp_path / "run")).acquire()
    assert not (tmp_path / "run" / LOCK).exists()
    with RunLock(str(tmp_path / "run")):  # free again
        pass


def test_empty_lock_file_is_no_stale_holder(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK).write_text("")
    said = []
    with RunLock(str(tmp_path / "run"), said.append):
        pass
    assert said == []


def test_library_train_holds_the_lock(base, tmp_path):
    out = copy_run(base, tmp_path)
    with RunLock(str(out)):
        cfg = dx_train.TrainConfig(data="moons", out=str(out), field="exact", steps=9, device="cpu",
                                   progress=False, evaluate=False)
        with pytest.raises(RunFolderBusy, match="in use"):
            dx_train.train(cfg, resume=True)


# --------------------------------------------------------------------------- 2. checksums, the last two


def test_checkpoints_carry_checksums_and_the_previous_is_kept(base):
    assert load(base / "checkpoint.pt")["step"] == 6
    assert load(base / "checkpoint.prev.pt")["step"] == 3
    assert verifies(base / "checkpoint.pt") and verifies(base / "checkpoint.prev.pt")
    assert not (base / LOCK).exists()


def test_final_checkpoint_at_a_checkpoint_step_keeps_the_older_one(tmp_path):
    out = tmp_path / "run"
    train(out, "--checkpoint-every", "2", steps=4)  # periodic at 2 and 4, then the final save (step 4)
    assert load(out / "checkpoint.pt")["step"] == 4
    assert load(out / "checkpoint.prev.pt")["step"] == 2


@pytest.mark.parametrize("how", list(DAMAGE))
@pytest.mark.parametrize("command", ["sample", "eval"])
def test_damaged_checkpoint_is_refused_by_sample_and_eval(base, tmp_path, how, command):
    out = copy_run(base, tmp_path)
    damage(out / "checkpoint.pt", how)
    args = ["sample", "--run", out, "--out", tmp_path / "x.npz"] if command == "sample" else ["eval", "--run", out]
    assert_refused(invoke(*args), str(out / "checkpoint.pt"), REASON[how], "--resume", "checkpoint.prev.pt")
    assert not (tmp_path / "x.npz").exists() and not (out / "eval.json").exists()


@pytest.mark.parametrize("how", list(DAMAGE))
def test_resume_falls_back_to_the_previous_checkpoint(base, tmp_path, how):
    out = copy_run(base, tmp_path)
    damage(out / "checkpoint.pt", how)
    result = train(out, "--resume")
    assert f"checkpoint.pt {REASON[how]}" in result.stderr
    assert "resuming from checkpoint.prev.pt (step 3)" in result.stderr and "at step 3" in result.stderr
    final = load(out / "checkpoint.pt")
    assert final["step"] == 6 and verifies(out / "checkpoint.pt")
    assert same_weights(final["generator"], load(base / "checkpoint.pt")["generator"])  # bit-identical
    assert load(out / "checkpoint.prev.pt")["step"] == 3 and verifies(out / "checkpoint.prev.pt")
    assert metrics_steps(out) == metrics_steps(base) == [2, 4, 6]


class Crash(Exception):
    pass


@pytest.mark.parametrize("at", [1, 2, 3, 4, 5])
def test_a_crash_anywhere_in_a_save_leaves_an_intact_checkpoint(base, tmp_path, monkeypatch, at):
    """The second save (step 6) writes five files: prev's sidecar, (the link,) prev's sidecar again, the
    sidecar, checkpoint.pt, the sidecar again.  Dying before any of them leaves checkpoint.pt verifying:
    no fallback is needed, and the run resumes to the same weights."""
    import dxtrain.rundir as rd

    real, calls = rd.atomic_write, []

    def dying(path, write, mode="wb"):
        if os.path.basename(path).startswith("checkpoint"):
            calls.append(os.path.basename(path))
            if len(calls) == 3 + at:  # the first save (step 3) writes three
                raise Crash(f"killed before writing {path}")
        return real(path, write, mode)

    monkeypatch.setattr(rd, "atomic_write", dying)
    out = tmp_path / "run"
    result = train(out, ok=False)
    monkeypatch.undo()
    assert result.exit_code == 1 and "Crash: killed before writing" in result.output, describe(result)  # one Error line
    result = invoke("sample", "--run", out, "--out", tmp_path / "x.npz")
    assert result.exit_code == 0, describe(result)
    result = train(out, "--resume")
    assert "resuming from checkpoint.prev.pt" not in result.stderr
    assert same_weights(load(out / "checkpoint.pt")["generator"], load(base / "checkpoint.pt")["generator"])


def test_missing_checkpoint_falls_back_to_the_previous(base, tmp_path):
    out = copy_run(base, tmp_path)
    os.unlink(out / "checkpoint.pt")
    result = train(out, "--resume")
    assert "checkpoint.pt is missing" in result.stderr and "(step 3)" in result.stderr
    assert load(out / "checkpoint.pt")["step"] == 6


def test_damaged_sidecar_counts_as_damage(base, tmp_path):
    out = copy_run(base, tmp_path)
    (out / "checkpoint.sha256").write_text("not a checksum\n")
    assert_refused(invoke("sample", "--run", out, "--out", tmp_path / "x.npz"), "checkpoint.sha256")
    result = train(out, "--resume")
    assert "resuming from checkpoint.prev.pt" in result.stderr


def test_resume_with_both_checkpoints_damaged_is_refused(base, tmp_path):
    out = copy_run(base, tmp_path)
    damage(out / "checkpoint.pt", "flipped-byte")
    damage(out / "checkpoint.prev.pt", "truncated")
    before = (out / "metrics.jsonl").read_bytes()
    assert_refused(train(out, "--resume", ok=False), str(out / "checkpoint.pt"), "checkpoint.prev.pt",
                   "no intact checkpoint", "--out")
    assert (out / "metrics.jsonl").read_bytes() == before


def test_resume_with_damage_and_no_previous_is_refused(base, tmp_path):
    out = copy_run(base, tmp_path)
    os.unlink(out / "checkpoint.prev.pt")
    damage(out / "checkpoint.pt", "empty")
    assert_refused(train(out, "--resume", ok=False), str(out / "checkpoint.pt"), "is empty",
                   "no checkpoint.prev.pt to fall back to")


def _make_legacy(out):
    """As written before checksums: checkpoint.pt alone."""
    for name in ("checkpoint.sha256", "checkpoint.prev.pt", "checkpoint.prev.sha256"):
        os.unlink(out / name)


def test_checkpoint_without_checksum_still_loads(base, tmp_path):
    out = copy_run(base, tmp_path)
    _make_legacy(out)
    result = invoke("sample", "--run", out, "--out", tmp_path / "x.npz")
    assert result.exit_code == 0, describe(result)
    assert "has no checksum" in result.stderr


def test_resume_of_a_checkpoint_without_checksum(base, tmp_path):
    out = copy_run(base, tmp_path)
    _make_legacy(out)
    result = train(out, "--resume", steps=8)
    assert "has no checksum" in result.stderr and "at step 6" in result.stderr
    assert load(out / "checkpoint.pt")["step"] == 8 and verifies(out / "checkpoint.pt")
    assert load(out / "checkpoint.prev.pt")["step"] == 6 and verifies(out / "checkpoint.prev.pt")


@pytest.mark.parametrize("content,reason", [
    (b"\x00\x01not a pickle" * 50, "is not a readable checkpoint"),
    (None, "is not a dxtrain checkpoint"),
])
def test_foreign_file_without_checksum_is_refused(base, tmp_path, content, reason):
    out = copy_run(base, tmp_path)
    _make_legacy(out)
    if content is None:
        torch.save({"weights": torch.zeros(3)}, out / "checkpoint.pt")
    else:
        (out / "checkpoint.pt").write_bytes(content)
    assert_refused(invoke("eval", "--run", out), str(out / "checkpoint.pt"), reason)
    assert_refused(train(out, "--resume", ok=False), str(out / "checkpoint.pt"), reason, "--out")


# --------------------------------------------------------------------------- 3. leftovers


def test_fresh_run_starts_metrics_empty_and_removes_temp_files(tmp_path):
    out = tmp_path / "run"
    (out / "samples").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in range(1, 30)))
    (out / "config.json.q1w2e3r4.tmp").write_text("{")
    (out / "samples" / "step-000003.png.a1b2c3d4.tmp").write_bytes(b"\x89PNG")
    result = train(out)
    assert "starting it empty" in result.stderr
    assert "removed 2 temporary file(s)" in result.stderr
    assert metrics_steps(out) == [2, 4, 6]
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    assert not [p for p in os.listdir(out / "samples") if p.endswith(".tmp")]


def test_fresh_run_refuses_a_folder_with_only_the_previous_checkpoint(base, tmp_path):
    out = copy_run(base, tmp_path)
    for name in ("checkpoint.pt", "checkpoint.sha256"):
        os.unlink(out / name)
    assert_refused(train(out, ok=False), "already holds a run", "--resume")
    assert load(out / "checkpoint.prev.pt")["step"] == 3


# --------------------------------------------------------------------------- 4. resume keeps the run's settings


@pytest.mark.parametrize("option,expected", [
    (["--lr", "0.01"], "lr: 0.001 -> 0.01"),
    (["--batch", "80"], "batch: 40 -> 80"),
    (["--field", "projected"], "field: 'exact' -> 'projected'"),
    (["--data", "checkerboard"], "data: 'moons' -> 'checkerboard'"),
    (["--seed", "3"], "seed: 0 -> 3"),
    (["--temperatures", "0.1"], "temperatures: (0.02, 0.05, 0.2) -> (0.1,)"),
    (["--unconditional"], "conditional: True -> False"),
    (["--encoder", "builtin"], "encoder: 'none' -> 'builtin'"),
])
def test_resume_refuses_a_changed_setting(base, tmp_path, option, expected):
    out = copy_run(base, tmp_path)
    before = (out / "checkpoint.pt").read_bytes()
    result = train(out, "--resume", *option, steps=9, ok=False)
    assert_refused(result, "--resume", str(out), expected, "another --out")
    assert (out / "checkpoint.pt").read_bytes() == before


def test_resume_lists_every_changed_setting(base, tmp_path):
    out = copy_run(base, tmp_path)
    line = assert_refused(train(out, "--resume", "--lr", "0.01", "--batch", "80", "--steps", "9", ok=False),
                          "lr: 0.001 -> 0.01", "batch: 40 -> 80")
    assert "steps" not in line  # a safe change is no reason to refuse


def test_resume_accepts_and_announces_safe_changes_bit_identically(base, straight9, tmp_path):
    out = copy_run(base, tmp_path)
    result = train(out, "--resume", "--log-every", "1", "--sample-every", "9", "--checkpoint-every", "9", steps=9)
    assert "changed on resume" in result.stderr
    for change in ("steps 6 -> 9", "log_every 2 -> 1", "sample_every 3 -> 9", "checkpoint_every 3 -> 9"):
        assert change in result.stderr, change
    a, b = load(straight9 / "checkpoint.pt"), load(out / "checkpoint.pt")
    assert b["step"] == 9 and same_weights(a["generator"], b["generator"])
    assert same_weights(a["ema"]["model"], b["ema"]["model"])
    assert b["config"]["log_every"] == 1 and b["config"]["checkpoint_every"] == 9
    assert metrics_steps(out) == [2, 4, 6, 7, 8, 9]


def test_resume_accepts_budget_device_memory_and_progress(base, tmp_path):
    out = copy_run(base, tmp_path)
    result = train(out, "--resume", "--time-budget", "1000", "--memory-budget", "64MiB", "--progress", steps=7)
    for change in ("time_budget None -> 1000.0", "memory_budget None -> '64MiB'", "progress False -> True"):
        assert change in result.stderr, change
    config = load(out / "checkpoint.pt")["config"]
    assert config["time_budget"] == 1000.0 and config["memory_budget"] == "64MiB" and config["steps"] == 7


def test_resume_takes_the_options_left_out_from_the_checkpoint(base, tmp_path):
    out = copy_run(base, tmp_path)
    result = invoke("train", "--out", out, "--resume", "--steps", "8")  # no --data, --field, --batch, ...
    assert result.exit_code == 0, describe(result)
    assert "resume: steps 6 -> 8 (changed on resume)" in result.stderr
    config = load(out / "checkpoint.pt")["config"]
    assert (config["data"], config["field"], config["batch"], config["encoder"], config["evaluate"]) == \
        ("moons", "exact", 40, "none", False)
    assert not (out / "eval.json").exists()


def test_resume_of_a_finished_run_changes_nothing(base, tmp_path):
    out = copy_run(base, tmp_path)
    before = {p: (out / p).read_bytes() for p in ("checkpoint.pt", "checkpoint.prev.pt")}
    result = invoke("train", "--out", out, "--resume")
    assert result.exit_code == 0, describe(result)
    assert "already has its 6 steps" in result.stderr and "--steps" in result.stderr
    assert {p: (out / p).read_bytes() for p in before} == before


def _library_config(out, **kw):
    return dx_train.TrainConfig(**{**dict(data="moons", out=str(out), field="exact", steps=7, batch=40,
                                          positives=60, landmarks=8, log_every=2, sample_every=3,
                                          checkpoint_every=3, evaluate=False, progress=False, device="cpu",
                                          encoder="none"), **kw})


def test_library_resume_without_given_compares_nothing(base, tmp_path):
    out = copy_run(base, tmp_path)
    said = []
    dx_train.train(_library_config(out, lr=0.5, batch=99), resume=True, log=said.append)
    config = load(out / "checkpoint.pt")["config"]
    assert config["lr"] == 0.001 and config["batch"] == 40 and config["steps"] == 7  # as before: stopping from cfg


def test_library_resume_with_given_compares_those(base, tmp_path):
    out = copy_run(base, tmp_path)
    cfg = _library_config(out, lr=0.5, batch=99)
    with pytest.raises(ValueError, match=r"lr: 0.001 -> 0.5") as info:
        dx_train.train(cfg, resume=True, given={"lr", "steps"})
    assert "batch" not in str(info.value)  # not given: not compared
    with pytest.raises(ValueError, match="unknown setting"):
        dx_train.train(cfg, resume=True, given={"learning_rate"})
    said = []
    dx_train.train(cfg, resume=True, given={"steps"}, log=said.append)
    assert any("steps 6 -> 7" in line for line in said)
    assert load(out / "checkpoint.pt")["config"]["lr"] == 0.001


def _tensors_equal(a, b) -> bool:
    """Recursive bit-for-bit equality of checkpoint parts (dicts, lists, tensors, numbers)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_tensors_equal, a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


@posix
@pytest.mark.parametrize("seed", [1, 2])
def test_kill_9_at_random_moments_then_resume_ends_bit_identical(tmp_path, seed):
    """``kill -9`` at seeded random moments (in the set-up, between steps, inside checkpoint writes),
    each followed by ``--resume`` (or a fresh start while no checkpoint exists), until the run ends:
    its weights, EMA, optimiser state and random streams equal an uninterrupted run's, bit for bit."""
    import random

    steps, every = 60, ["--checkpoint-every", "1"]

    def run(out, *extra):
        cmd = [sys.executable, "-m", "dxtrain", "train", "--data", "moons", "--out", str(out), "--steps", str(steps),
               *FAST, *every, *extra]
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)

    t0 = time.monotonic()
    straight = run(tmp_path / "straight")
    assert straight.wait(300) == 0, straight.stderr.read().decode()
    whole = time.monotonic() - t0  # start-up, set-up, steps and checkpoints: the kills land anywhere in it
    rng = random.Random(seed)
    for trial in range(3):  # a run that ends before its first kill says nothing: start over
        out, kills = tmp_path / f"run{trial}", 0
        for _ in range(20):
            resume = ["--resume"] if (out / "checkpoint.pt").exists() or (out / "checkpoint.prev.pt").exists() else []
            proc = run(out, *resume)
            if kills < 4:
                try:
                    proc.wait(rng.uniform(0.15, 0.85) * whole)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    kills += 1
            code = proc.wait(300)
            err = proc.stderr.read().decode()
            if code == 0:
                break
            assert code == -signal.SIGKILL, err  # anything else is a failure of the resume
        else:
            raise AssertionError("the run never finished")
        if kills:
            break
    assert kills >= 1
    a, b = load(tmp_path / "straight" / "checkpoint.pt"), load(out / "checkpoint.pt")
    assert a["step"] == b["step"] == steps
    for part in ("generator", "ema", "optimizer", "rng"):
        assert _tensors_equal(a[part], b[part]), part
    assert metrics_steps(out) == metrics_steps(tmp_path / "straight")
