"""No silent failure, no traceback: every bad input and fault of the ``dxtrain`` CLI gets one clear line.

Each case runs the real command line (click's ``CliRunner``, or a subprocess where the
process matters) and checks the rule of dxtrain/errors.py: the output ends in exactly one
``Error: ...`` line naming the cause (the option or file) and the fix, the exit status is 1
(a malformed command line too, after click's usage lines; 130 for an interrupt), and no
traceback is printed -- unless ``dxtrain --debug`` (or ``DXTRAIN_DEBUG=1``) asks for it.

Faults a test cannot cause for real (a full disk; a read-only folder when the tests run as
root, where chmod stops nothing) are simulated with stubs that raise the ``OSError`` the
operating system would.  Runs are tiny: moons, exact field, 2 steps, batch 40, on the CPU.
"""

import errno
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import dxtrain  # noqa: F401  (before torch: the trainer's thread settings)

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

import dxfield.atomic  # noqa: E402
import dxtrain.errors as dx_errors  # noqa: E402
import dxtrain.fields as dx_fields  # noqa: E402
import dxtrain.models as dx_models  # noqa: E402
import dxtrain.rundir as dx_rundir  # noqa: E402
import dxtrain.train as dx_train  # noqa: E402
from dxtrain.cli import main  # noqa: E402
from dxtrain.train import TrainConfig  # noqa: E402

TINY = ["--batch", "40", "--positives", "60", "--landmarks", "8", "--no-eval", "--no-progress", "--device", "cpu",
        "--encoder", "none"]
ROOT_WRITES_ANYWHERE = pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                                          reason="running as root: chmod 555 does not stop root's writes "
                                                 "(the stubbed cases below cover the same messages)")


# --------------------------------------------------------------------------- helpers


def cli(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True, env=env)


def train_args(out, *extra, data="moons", steps=2):
    return ["train", "--data", data, "--out", out, "--steps", steps, "--field", "exact", *TINY, *extra]


def assert_one_error(result, *needles, code=1):
    """Exit ``code`` through a handled error; the output ends in exactly one ``Error:`` line, which
    names every needle; no traceback."""
    out = result.output
    assert result.exit_code == code, f"exit {result.exit_code}\n{out}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in out and "Aborted!" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, out
    assert [line for line in out.splitlines() if line.strip()][-1] == errors[0], out
    for needle in needles:
        assert str(needle).lower() in errors[0].lower(), (needle, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained run (moons, exact field, 2 steps)."""
    out = tmp_path_factory.mktemp("errors") / "run"
    result = cli(*train_args(out))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def run_copy(run, tmp_path):
    """A private copy of ``run`` to damage."""
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


@pytest.fixture
def no_data_loading(monkeypatch):
    """Fails the test if a command loads data (the checks must come first)."""
    calls = []
    real = dx_train.setup
    monkeypatch.setattr(dx_train, "setup", lambda cfg: calls.append(cfg.data) or real(cfg))
    yield
    assert not calls, f"data was loaded before the error: {calls}"


def deny_writes(monkeypatch, folder):
    """os.access says ``folder`` is not writable (as chmod 555 would for anyone but root)."""
    real, folder = os.access, os.path.abspath(folder)

    def access(path, mode, *args, **kwargs):
        if os.path.abspath(path) == folder and mode & os.W_OK:
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def raiser(exc):
    def fail(*args, **kwargs):
        raise exc
    return fail


# --------------------------------------------------------------------------- 1. damaged checkpoints


def _empty(path):
    path.write_bytes(b"")


def _truncated(path):
    path.write_bytes(path.read_bytes()[:1000])


def _random(path):
    path.write_bytes(np.random.default_rng(0).bytes(5000))


def _no_sidecar_random(path):
    _random(path)
    (path.parent / "checkpoint.sha256").unlink()


def _no_sidecar_empty(path):
    _empty(path)
    (path.parent / "checkpoint.sha256").unlink()


def _folder(path):
    path.unlink()
    path.mkdir()


DAMAGE = {"empty": _empty, "truncated": _truncated, "random-bytes": _random,
          "random-no-sidecar": _no_sidecar_random, "empty-no-sidecar": _no_sidecar_empty, "a-folder": _folder}


@pytest.mark.parametrize("command", ["sample", "eval"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_one_error_line(run_copy, tmp_path, command, damage):
    DAMAGE[damage](run_copy / "checkpoint.pt")
    extra = ["--out", tmp_path / "s.npz"] if command == "sample" else []
    assert_one_error(cli(command, "--run", run_copy, *extra), "checkpoint.pt")


def test_damaged_checkpoint_in_a_subprocess(run_copy, tmp_path):
    """The real process: stderr ends in one Error line, exit 1, no 'Aborted!' (an empty file once gave that)."""
    (run_copy / "checkpoint.pt").write_bytes(b"")
    proc = subprocess.run([sys.executable, "-m", "dxtrain", "sample", "--run", str(run_copy), "--out",
                           str(tmp_path / "s.npz")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("Error:") and "checkpoint.pt" in lines[-1], proc.stderr
    assert sum(line.startswith("Error:") for line in lines) == 1
    assert "Traceback" not in proc.stderr and "Aborted" not in proc.stderr


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_run_folder_missing(tmp_path, command):
    extra = ["--out", tmp_path / "s.npz"] if command == "sample" else []
    assert_one_error(cli(command, "--run", tmp_path / "nowhere", *extra), "--run", "nowhere", "no such folder")


# --------------------------------------------------------------------------- 2. where the output goes


def test_summarize_out_is_a_file_refused_before_the_work(tmp_path, no_data_loading):
    (tmp_path / "afile").write_text("x")
    result = cli("summarize", "--data", "moons", "--out", tmp_path / "afile", "--landmarks", 8, "--device", "cpu",
                 "--encoder", "none")
    assert_one_error(result, "--out", "afile", "is a file")
    assert (tmp_path / "afile").read_text() == "x"


def test_train_out_is_a_file(tmp_path, no_data_loading):
    (tmp_path / "afile").write_text("x")
    assert_one_error(cli(*train_args(tmp_path / "afile")), "--out", "afile", "is a file")


def test_train_out_under_a_file(tmp_path, no_data_loading):
    (tmp_path / "afile").write_text("x")
    assert_one_error(cli(*train_args(tmp_path / "afile" / "run")), "--out", "afile", "is a file")


def test_train_cache_is_a_file(tmp_path, no_data_loading):
    (tmp_path / "afile").write_text("x")
    result = cli("train", "--data", "moons", "--out", tmp_path / "run", "--steps", 2, "--cache", tmp_path / "afile",
                 *TINY)
    assert_one_error(result, "--cache", "afile", "is a file")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command,option", [("train", "--out"), ("summarize", "--out"), ("train", "--cache")])
@pytest.mark.parametrize("where", ["folder", "parent"])
def test_read_only_destination_refused_before_the_work(tmp_path, monkeypatch, no_data_loading, command, option,
                                                       where):
    ro = tmp_path / "ro"
    ro.mkdir()
    target = ro if where == "folder" else ro / "new"
    deny_writes(monkeypatch, ro)
    if command == "summarize":
        args = ["summarize", "--data", "moons", "--out", target, "--landmarks", 8, "--device", "cpu"]
    elif option == "--cache":
        args = ["train", "--data", "moons", "--out", tmp_path / "run", "--steps", 2, "--cache", target, *TINY]
    else:
        args = train_args(target)
    assert_one_error(cli(*args), option, str(ro), "permission denied", "chmod")


def test_read_only_filled_cache_is_fine(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text("{}")
    deny_writes(monkeypatch, cache)
    dx_errors.check_folder(cache, "--cache", read_only_ok=True)  # only read: no error


@ROOT_WRITES_ANYWHERE
def test_read_only_parent_for_real(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert_one_error(cli(*train_args(ro / "run")), "--out", "permission denied")
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("filename", [None, "inside"], ids=["no-filename", "with-filename"])
def test_disk_full_while_training(tmp_path, monkeypatch, filename):
    out = tmp_path / "run"
    name = None if filename is None else str(out / "config.json.abc.tmp")
    monkeypatch.setattr(dx_rundir, "write_config", raiser(OSError(errno.ENOSPC, "No space left on device", name)))
    line = assert_one_error(cli(*train_args(out)), "no space left on device", str(out), "--out")
    assert "Errno" not in line


def test_disk_full_while_checkpointing(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(dx_rundir, "write_checkpoint", raiser(OSError(errno.ENOSPC, "No space left on device")))
    assert_one_error(cli(*train_args(out)), "no space left on device", str(out), "--out")
    assert (out / "metrics.jsonl").exists()  # it failed while checkpointing, after the steps


def test_disk_full_in_an_atomic_write(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(dx_rundir, "atomic_write", raiser(OSError(errno.ENOSPC, "No space left on device")))
    assert_one_error(cli(*train_args(out)), "no space left on device", str(out))


def test_permission_lost_while_training(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(dx_rundir, "write_config",
                        raiser(PermissionError(errno.EACCES, "Permission denied", str(out / "config.json"))))
    assert_one_error(cli(*train_args(out)), "permission denied", "config.json", "--out")


def test_disk_full_while_saving_summaries(tmp_path, monkeypatch):
    out = tmp_path / "cache"
    monkeypatch.setattr(dx_fields.ProjectedFieldSet, "save", raiser(OSError(errno.ENOSPC, "No space left")))
    result = cli("summarize", "--data", "moons", "--out", out, "--landmarks", 8, "--device", "cpu")
    assert_one_error(result, "no space left on device", str(out), "--out")


def test_disk_full_while_writing_samples(run, tmp_path, monkeypatch):
    monkeypatch.setattr(dxfield.atomic, "atomic_write", raiser(OSError(errno.ENOSPC, "No space left")))
    result = cli("sample", "--run", run, "--n", 4, "--out", tmp_path / "s.npz")
    assert_one_error(result, "no space left on device", "s.npz", "--out")


def test_sample_out_is_a_folder(run, tmp_path):
    (tmp_path / "d.npz").mkdir()
    assert_one_error(cli("sample", "--run", run, "--out", tmp_path / "d.npz"), "--out", "d.npz", "is a folder")


def test_sample_out_in_read_only_folder(run, tmp_path, monkeypatch):
    deny_writes(monkeypatch, tmp_path)
    result = cli("sample", "--run", run, "--out", tmp_path / "s.npz")
    assert_one_error(result, "--out", "s.npz", "permission denied")


# --------------------------------------------------------------------------- 3. sample/eval: data and eval.json


@pytest.fixture
def moved_run(tmp_path, monkeypatch):
    """A run trained on a user's .npz file (a relative path), which then moves away."""
    monkeypatch.chdir(tmp_path)
    np.savez("pts.npz", x=np.random.default_rng(0).normal(size=(300, 2)).astype(np.float32))
    assert cli(*train_args("run", data="pts.npz")).exit_code == 0
    os.rename("pts.npz", "moved.npz")
    return tmp_path / "run"


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_data_file_moved(moved_run, tmp_path, command):
    extra = ["--out", tmp_path / "s.npz"] if command == "sample" else []
    line = assert_one_error(cli(command, "--run", moved_run, *extra), "pts.npz", "not found", "--data",
                            "config.json")
    assert str(tmp_path) in line  # where a relative path was looked for


def test_train_says_the_same_of_a_missing_file(tmp_path):
    assert_one_error(cli(*train_args(tmp_path / "run", data=tmp_path / "gone.npz")), "gone.npz", "not found")


def test_moved_data_given_with_data_option(moved_run, tmp_path, classifier_cache):
    result = cli("sample", "--run", moved_run, "--n", 4, "--out", tmp_path / "s.npz", "--data", "moved.npz")
    assert result.exit_code == 0, result.output
    result = cli("eval", "--run", moved_run, "--n", 20, "--data", "moved.npz")
    assert result.exit_code == 0, result.output


def test_data_option_of_another_shape_is_refused(moved_run, tmp_path):
    np.savez(tmp_path / "other.npz", x=np.zeros((50, 3), np.float32))
    result = cli("eval", "--run", moved_run, "--data", tmp_path / "other.npz")
    assert_one_error(result, "--data", "other.npz", "shape", "pts.npz")


@pytest.fixture
def classifier_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DXTRAIN_CACHE", str(tmp_path / "dxtrain-cache"))


def test_eval_with_one_test_sample(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.savez("tiny.npz", x=np.random.default_rng(0).normal(size=(6, 2)).astype(np.float32))
    result = cli("train", "--data", "tiny.npz", "--out", "run", "--steps", 2, "--field", "exact", "--batch", 4,
                 "--positives", 4, "--no-eval", "--no-progress", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert_one_error(cli("eval", "--run", "run"), "tiny.npz", "1 of its 6", "at least 2", "more data")


def test_eval_that_cannot_write_eval_json_still_prints(run_copy, monkeypatch, classifier_cache):
    real = dx_rundir.write_eval

    def write_eval(folder, report):
        if os.path.abspath(folder) == os.path.abspath(run_copy):
            raise OSError(errno.ENOSPC, "No space left on device", str(run_copy / "eval.json.x.tmp"))
        real(folder, report)

    monkeypatch.setattr(dx_rundir, "write_eval", write_eval)
    result = cli("eval", "--run", run_copy, "--n", 20)
    assert_one_error(result, "eval.json", "no space left on device", "printed")
    report = json.loads(result.stdout)
    assert report["step"] == 2 and report["n_samples"] == 20
    assert not (run_copy / "eval.json").exists()


def test_eval_missing_inception_weights(run):
    result = cli("eval", "--run", run, "--inception-weights", "/nowhere/inception.pth")
    assert_one_error(result, "--inception-weights", "/nowhere/inception.pth")


# --------------------------------------------------------------------------- 4. options checked at parse time


BAD_TRAIN_OPTIONS = [
    ("--lr", "inf"), ("--lr", "nan"), ("--lr", "-1"), ("--lr", "0"), ("--grad-clip", "inf"), ("--ema", "nan"),
    ("--ema", "1"), ("--time-budget", "nan"), ("--time-budget", "0"), ("--seed", "-1"),
    ("--memory-budget", "abc"), ("--memory-budget", "0"), ("--memory-budget", "-5MiB"), ("--temperatures", "nan"),
    ("--temperatures", "0.1,inf"), ("--temperatures", "0.1,-1"), ("--temperatures", ","), ("--device", "foo"),
    ("--batch", "0"), ("--landmarks", "0"), ("--steps", "-3"),
]


@pytest.mark.parametrize("option,value", BAD_TRAIN_OPTIONS, ids=[f"{o}={v}" for o, v in BAD_TRAIN_OPTIONS])
def test_bad_train_option_is_refused_before_the_work(tmp_path, no_data_loading, option, value):
    result = cli("train", "--data", "moons", "--out", tmp_path / "run", "--no-progress", option, value)
    assert_one_error(result, option, code=1)  # click's usage error: 'Invalid value for '--lr': ...'
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option,value", [("--test-fraction", "nan"), ("--test-fraction", "1"), ("--seed", "-2"),
                                          ("--temperatures", "inf"), ("--device", "gpu0")])
def test_bad_summarize_option(tmp_path, no_data_loading, option, value):
    result = cli("summarize", "--data", "moons", "--out", tmp_path / "c", option, value)
    assert_one_error(result, option, code=1)


@pytest.mark.parametrize("args", [["--label", "-1"], ["--n", "0"], ["--seed", "-1"]], ids=lambda a: "=".join(a))
def test_bad_sample_option(run, tmp_path, args):
    assert_one_error(cli("sample", "--run", run, "--out", tmp_path / "s.npz", *args), args[0], code=1)


@pytest.mark.parametrize("name,value", [("lr", float("inf")), ("lr", float("nan")), ("lr", -1.0),
                                        ("grad_clip", float("inf")), ("weight_decay", -0.1),
                                        ("weight_decay", float("nan")), ("temperatures", (0.1, float("nan"))),
                                        ("temperatures", ()), ("memory_budget", "lots")])
def test_validate_names_the_setting(name, value):
    with pytest.raises(ValueError, match=name):
        TrainConfig(**{name: value}).validate()


def test_validate_accepts_the_defaults_and_a_budget():
    TrainConfig(memory_budget="256MiB", weight_decay=0.0).validate()


# --------------------------------------------------------------------------- 5. anything else that escapes


def test_torch_runtime_error_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(dx_train, "make_generator",
                        raiser(RuntimeError("CUDA error: device-side assert triggered\nCompile with ...")))
    line = assert_one_error(cli(*train_args(tmp_path / "run")), "RuntimeError", "device-side assert", "--debug")
    assert "Compile with" in line  # the whole message, on one line


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_runtime_error_in_sample_and_eval(run, tmp_path, monkeypatch, command):
    monkeypatch.setattr(dx_models, "generate", raiser(RuntimeError("boom")))
    monkeypatch.setattr(dx_train, "generate", raiser(RuntimeError("boom")))
    extra = ["--out", tmp_path / "s.npz"] if command == "sample" else []
    assert_one_error(cli(command, "--run", run, *extra), "RuntimeError: boom")


@pytest.mark.parametrize("exc,needle", [(MemoryError(), "out of memory"),
                                        (RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), "--batch"),
                                        (EOFError("Ran out of input"), "ended too early"),
                                        (OSError(errno.EIO, "Input/output error", "/dev/x"), "/dev/x")])
def test_other_exceptions_are_described(tmp_path, monkeypatch, exc, needle):
    monkeypatch.setattr(dx_train, "make_generator", raiser(exc))
    assert_one_error(cli(*train_args(tmp_path / "run")), needle)


@pytest.mark.parametrize("command", ["train", "summarize"])
def test_keyboard_interrupt_during_set_up(tmp_path, monkeypatch, command):
    monkeypatch.setattr(dx_train, "setup", raiser(KeyboardInterrupt()))
    args = train_args(tmp_path / "run") if command == "train" else \
        ["summarize", "--data", "moons", "--out", tmp_path / "c", "--device", "cpu"]
    assert_one_error(cli(*args), "interrupted", code=130)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(tmp_path, monkeypatch, how):
    monkeypatch.setattr(dx_train, "make_generator", raiser(RuntimeError("boom")))
    args = train_args(tmp_path / "run")
    result = cli("--debug", *args) if how == "flag" else cli(*args, env={dx_errors.DEBUG_ENV: "1"})
    assert isinstance(result.exception, RuntimeError) and str(result.exception) == "boom"


def test_debug_reraises_the_cause_of_a_handled_error(run_copy):
    (run_copy / "checkpoint.pt").write_bytes(b"")
    result = cli("--debug", "eval", "--run", run_copy)
    assert isinstance(result.exception, dx_rundir.CheckpointError)


def test_debug_in_a_subprocess_prints_a_traceback(run_copy, tmp_path):
    (run_copy / "checkpoint.pt").write_bytes(b"")
    env = {**os.environ, dx_errors.DEBUG_ENV: "1"}
    proc = subprocess.run([sys.executable, "-m", "dxtrain", "sample", "--run", str(run_copy), "--out",
                           str(tmp_path / "s.npz")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "CheckpointError" in proc.stderr, proc.stderr


# --------------------------------------------------------------------------- the messages themselves


@pytest.mark.parametrize("code,needle", [(errno.ENOSPC, "no space left on device"), (errno.EACCES, "permission"),
                                         (errno.EROFS, "read-only"), (errno.ENOTDIR, "not a folder"),
                                         (errno.EISDIR, "is a folder"), (errno.EEXIST, "already exists"),
                                         (errno.ENOENT, "no such file"), (errno.EIO, "errno")])
def test_os_error_message(code, needle):
    msg = dx_errors.os_error_message(OSError(code, os.strerror(code)), ("/runs/x", "--out"))
    assert needle in msg.lower() and "/runs/x" in msg and "\n" not in msg


def test_os_error_outside_the_target_does_not_blame_the_option():
    msg = dx_errors.os_error_message(OSError(errno.EACCES, "Permission denied", "/data/x.npz"), ("/runs/x", "--out"))
    assert "/data/x.npz" in msg and "--out" not in msg


@pytest.mark.parametrize("args,needle", [(["--bogus"], "--bogus"), (["nosuch"], "nosuch"),
                                         (["train", "--bogus"], "--bogus"), (["eval"], "--run"),
                                         (["sample", "--run"], "--run")])
def test_malformed_command_line_exits_1_with_one_error_line(args, needle):
    """A malformed command line is a failure like any other: click's usage lines, then one Error line, exit 1."""
    assert_one_error(cli(*args), needle)
