"""Every command line refuses each bad value when it is parsed: one 'error: ...' line naming
the flag and what it must be, exit status 2, and nothing run, written or traced back.

The commands run in-process through utils.run_cli, as `python SCRIPT ...` runs them; whatever
the scripts would do after parsing is replaced by a failure, so a value that gets through
fails its case at once instead of starting a run. Read-only folders are tried in a child
process without root's right to write anywhere (root passes every permission check).
"""
import argparse
import contextlib
import io
import json
import os
import shutil
import tempfile

import pytest

import bench
import evaluate
import mannequins
import runs
import sample
import training_superres
import training_transformer
import training_vqgan
import utils
import vqgan

COMMANDS = {  # command line -> (main, the words before the flags)
    "training_vqgan.py": (training_vqgan.main, []),
    "training_transformer.py": (training_transformer.main, []),
    "training_superres.py": (training_superres.main, []),
    "sample.py": (sample.main, ["--checkpoint", "run/transformer_last.pt"]),
    "evaluate.py": (evaluate.main, ["--vqgan-checkpoint", "run/vqgan.pt"]),
    "bench.py": (bench.main, ["vqgan"]),
    "mannequins.py": (mannequins.main, []),
    "vqgan.py": (vqgan.main, ["convert", "--ckpt", "last.ckpt", "--config", "model.yaml"]),
}
TRAINERS = ("training_vqgan.py", "training_transformer.py", "training_superres.py")
WITH_DEVICE = TRAINERS + ("sample.py", "evaluate.py", "bench.py")
WITH_DATA = TRAINERS + ("evaluate.py",)

# (commands, flag and value(s), the error line after 'error: '); A_FILE, A_FOLDER and
# READ_ONLY stand for paths the test makes
CASES = [
    # the fifteen tracebacks of issue 13
    (TRAINERS, ["--image-size", "0"], "--image-size must be >= 1, got 0"),
    (TRAINERS, ["--image-size", "-4"], "--image-size must be >= 1, got -4"),
    (TRAINERS, ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (TRAINERS, ["--batch-size", "-3"], "--batch-size must be >= 1, got -3"),
    (TRAINERS, ["--grad-accum", "0"], "--grad-accum must be >= 1, got 0"),
    (["training_vqgan.py"], ["--n-embed", "0"], "--n-embed must be >= 1, got 0"),
    (TRAINERS, ["--log-every", "0"], "--log-every must be >= 1, got 0"),
    (TRAINERS, ["--lr", "-1e-3"], "--lr must be a finite number > 0, got -1e-3"),
    (WITH_DEVICE, ["--device", "tpu9"], "--device must be auto, cpu, cuda, cuda:N or mps, "
                                        "got 'tpu9'"),
    (TRAINERS, ["--run-dir", "READ_ONLY/run"],
     "--run-dir must be a folder you can write to, but READ_ONLY is not writable (permission "
     "denied); choose another one"),
    (["sample.py"], ["--temperature", "nan"], "--temperature must be a finite number > 0, "
                                              "got nan"),
    (["sample.py"], ["--count", "0"], "--count must be >= 1, got 0"),
    (["sample.py", "evaluate.py", "bench.py"], ["--batch-size", "0"],
     "--batch-size must be >= 1, got 0"),
    (["sample.py"], ["--out", "A_FILE"], "--out must be a folder you can write to, but A_FILE "
                                         "is a file; choose another one"),
    # the same kinds of value elsewhere
    (WITH_DATA, ["--image-size", "-1"], "--image-size must be >= 1, got -1"),
    (WITH_DATA, ["--val-fraction", "1.5"], "--val-fraction must be between 0 and 1, got 1.5"),
    (WITH_DATA, ["--num-workers", "-1"], "--num-workers must be >= 0, got -1"),
    (WITH_DATA, ["--max-image-pixels", "0"], "--max-image-pixels must be >= 1, got 0"),
    (WITH_DATA, ["--part-labels", "coco"], "--part-labels must be mannequin, densepose or a "
                                           ".json file of your own labelling, got 'coco'"),
    (WITH_DATA, ["--part-labels", "A_FOLDER/none.json"],
     "--part-labels must be a labelling file this project reads, but cannot read "
     "A_FOLDER/none.json: No such file or directory"),
    (TRAINERS, ["--max-steps", "0"], "--max-steps must be >= 1, got 0"),
    (TRAINERS, ["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (TRAINERS, ["--save-every", "0"], "--save-every must be >= 1, got 0"),
    (TRAINERS, ["--sample-every", "-2"], "--sample-every must be >= 1, got -2"),
    (TRAINERS, ["--warmup-steps", "-1"], "--warmup-steps must be >= 0, got -1"),
    (TRAINERS, ["--base-lr", "inf"], "--base-lr must be a finite number > 0, got inf"),
    (TRAINERS, ["--min-lr-ratio", "2"], "--min-lr-ratio must be between 0 and 1, got 2"),
    (TRAINERS, ["--batch-size", "two"], "--batch-size must be an integer, got 'two'"),
    (TRAINERS, ["--run-dir", "A_FILE/run"], "--run-dir must be a folder you can write to, but "
                                            "A_FILE in that path is a file; choose another one"),
    (["training_vqgan.py"], ["--ch-mult", "1,0"], "--ch-mult must be comma-separated integers "
                                                  ">= 1, got '1,0'"),
    (["training_vqgan.py"], ["--lookup-dim", "-1"], "--lookup-dim must be >= 0, got -1"),
    (["training_vqgan.py"], ["--beta", "-0.25"], "--beta must be a finite number >= 0, "
                                                 "got -0.25"),
    (["training_vqgan.py"], ["--perceptual-weight", "nan"],
     "--perceptual-weight must be a finite number >= 0, got nan"),
    (["training_vqgan.py"], ["--disc-start", "-1"], "--disc-start must be >= 0, got -1"),
    (["training_transformer.py"], ["--n-head", "0"], "--n-head must be >= 1, got 0"),
    (["training_transformer.py"], ["--n-head", "3"], "--n-embd 128 must be a multiple of "
                                                     "--n-head 3, so that every head gets as "
                                                     "many channels"),
    (["training_transformer.py"], ["--pkeep", "1.1"], "--pkeep must be between 0 and 1, got 1.1"),
    (["training_transformer.py"], ["--grad-clip", "0"], "--grad-clip must be a finite number > "
                                                        "0, got 0"),
    (["training_transformer.py", "sample.py", "evaluate.py"], ["--top-p", "0"],
     "--top-p must be in (0, 1], got 0"),
    (["training_transformer.py", "sample.py", "evaluate.py"], ["--top-k", "0"],
     "--top-k must be >= 1, got 0"),
    (["training_transformer.py", "sample.py", "evaluate.py"], ["--temperature", "-1"],
     "--temperature must be a finite number > 0, got -1"),
    (["sample.py"], ["--num-samples", "0"], "--num-samples must be >= 1, got 0"),
    (["sample.py"], ["--pose-image-size", "0", "5"], "--pose-image-size must be >= 1, got 0"),
    (["sample.py"], ["--grid-size", "16", "-16"], "--grid-size must be >= 1, got -16"),
    (["sample.py"], ["--out", "READ_ONLY/samples"],
     "--out must be a folder you can write to, but READ_ONLY is not writable (permission "
     "denied); choose another one"),
    (["evaluate.py"], ["--json", "A_FOLDER"], "--json must be a file you can write, but "
                                              "A_FOLDER is a folder; choose another path"),
    (["evaluate.py"], ["--num-pose-samples", "0"], "--num-pose-samples must be >= 1, got 0"),
    (["evaluate.py"], ["--silhouette-threshold", "0"], "--silhouette-threshold must be a finite "
                                                       "number > 0, got 0"),
    (["bench.py"], ["--threads", "0"], "--threads must be >= 1, got 0"),
    (["bench.py"], ["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["bench.py"], ["--tokens", "-256"], "--tokens must be >= 1, got -256"),
    (["mannequins.py"], ["--count", "0"], "--count must be >= 1, got 0"),
    (["mannequins.py"], ["--image-size", "0"], "--image-size must be >= 1, got 0"),
    (["mannequins.py"], ["--workers", "0"], "--workers must be >= 1, got 0"),
    (["mannequins.py"], ["--out", "A_FILE"], "--out must be a folder you can write "
                                              "to, but A_FILE is a file; choose "
                                              "another one"),
    (["vqgan.py"], ["--out", "A_FOLDER"], "--out must be a file you can write, but A_FOLDER is "
                                          "a folder; choose another path"),
]
EXPANDED = [(command, flags, message) for commands, flags, message in CASES
            for command in commands]


def ran_past_parsing(*args, **kwargs):
    raise AssertionError("the command accepted its command line and went on to run")


def run_command(command, argv, unprivileged=False):
    """(exit status, stderr lines) of `python COMMAND ARGV`, in this process, or, unprivileged,
    in a child process that runs as the user 'nobody' when this one is root."""
    main, leading = COMMANDS[command]

    def run():
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            try:
                utils.run_cli(lambda: main(leading + argv))
                status = 0
            except SystemExit as stop:
                status = stop.code
        return status, stderr.getvalue().splitlines()

    if not unprivileged or os.geteuid() != 0:
        return run()
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child's coverage is not collected)
        try:
            os.setgid(65534)
            os.setuid(65534)
            result = run()
        except BaseException as error:
            result = (f"child failed: {type(error).__name__}: {error}", [])
        with os.fdopen(writer, "w") as pipe:
            json.dump(result, pipe)
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        result = json.load(pipe)
    os.waitpid(child, 0)
    return tuple(result)


@pytest.fixture(scope="module")
def paths():
    """A_FILE, A_FOLDER and a READ_ONLY folder that the user 'nobody' can see but not write."""
    base = tempfile.mkdtemp()
    os.chmod(base, 0o755)
    read_only = os.path.join(base, "read_only")
    os.mkdir(read_only, 0o555)
    os.chmod(read_only, 0o555)  # whatever the umask
    a_file = os.path.join(base, "a_file.png")
    with open(a_file, "w") as f:
        f.write("not a folder")
    yield {"READ_ONLY": read_only, "A_FILE": a_file, "A_FOLDER": base}
    os.chmod(read_only, 0o755)
    shutil.rmtree(base)


@pytest.fixture
def nothing_runs(monkeypatch):
    for owner, name in ((runs, "run_training"), (utils, "pick_device"),
                        (mannequins, "write_dataset"), (vqgan, "read_yaml")):
        monkeypatch.setattr(owner, name, ran_past_parsing)


@pytest.mark.parametrize("command, flags, message", EXPANDED,
                         ids=[f"{c} {' '.join(f)}" for c, f, _ in EXPANDED])
def test_every_command_refuses_each_bad_value_with_one_line_and_status_2(
        command, flags, message, paths, tmp_path, monkeypatch, nothing_runs):
    monkeypatch.chdir(tmp_path)  # nothing may be written, but if it were, it would be here

    def fill_in(text):
        for name, path in paths.items():
            text = text.replace(name, path)
        return text

    status, lines = run_command(command, [fill_in(flag) for flag in flags],
                                unprivileged="READ_ONLY" in " ".join(flags))
    assert (status, lines) == (2, [f"error: {fill_in(message)}"])
    assert os.listdir(tmp_path) == []
    assert os.listdir(paths["READ_ONLY"]) == []


def test_a_run_directory_that_cannot_be_written_stops_a_run_before_any_work(
        paths, vqgan_path, monkeypatch):
    """What the command line cannot see (here: its check skipped) the run finds first."""
    monkeypatch.setattr(runs, "output_folder", lambda text: text)
    vqgan_copy = os.path.join(paths["A_FOLDER"], "vqgan.pt")  # readable by 'nobody'
    shutil.copy(vqgan_path, vqgan_copy)
    os.chmod(vqgan_copy, 0o644)
    monkeypatch.chdir(paths["A_FOLDER"])  # where the default data would be generated
    run_dir = os.path.join(paths["READ_ONLY"], "run")
    for command, flags in (("training_vqgan.py", []),
                           ("training_transformer.py", ["--vqgan-checkpoint", vqgan_copy,
                                                        "--image-size", "32"])):
        status, lines = run_command(command, ["--run-dir", run_dir, "--device", "cpu", *flags],
                                    unprivileged=True)
        assert (status, lines) == (2, [
            f"error: cannot write into the run directory {run_dir} (Permission denied); choose "
            "another --run-dir, or fix its permissions or free space"])
    assert sorted(os.listdir(paths["A_FOLDER"])) == ["a_file.png", "read_only", "vqgan.pt"]


def all_actions(parser):
    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                yield from all_actions(subparser)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_no_flag_takes_a_bare_int_or_float(command, monkeypatch):
    """Each number flag names what it accepts (a type from cli), so that a new flag cannot
    bring back a traceback for 0, a negative number or nan."""
    parsers = []

    def capture(parser, *args, **kwargs):
        parsers.append(parser)
        raise SystemExit(0)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    main, leading = COMMANDS[command]
    with pytest.raises(SystemExit):
        main(leading)
    bare = [action.option_strings for parser in parsers for action in all_actions(parser)
            if action.type in (int, float) and action.dest != "seed"]
    assert bare == []
