"""One CLI language: every user error is one line naming the argument, exit code 2, before any heavy
work; ``-v`` anywhere; ``mgllava status``; ``mgllava run``'s arguments; Prefect's state under
``$MGLLAVA_HOME``."""

from __future__ import annotations

import ast
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mgllava.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
NOPE = "/no/such/path"

FULL_SIZE_INPUTS = [arg for field in ("model.llm.path", "model.vision.clip_path", "model.vision.convnext_path",
                                      "data.image_root", "data.pretrain_json", "data.finetune_json")
                    for arg in ("--set", f"{field}={{dir}}")]

# (command line, the argument its one error line names); "{dir}"/"{file}" are an existing directory/file
USER_ERRORS = [
    (["run", "--benchmarks", "pope,nope"], "--benchmarks"),
    (["run", "--preset", "no-such-preset"], "no-such-preset"),
    (["world", "--images", "many"], "--images"),
    (["zoo", "--world", NOPE], "--world"),
    (["detect", "--source", NOPE], "--source"),
    (["detect", "--classes", ","], "--classes"),
    (["detect", "--model", NOPE + ".pt", "--source", "{dir}", "--no-warehouse"], "--model"),
    (["detect", "import", "--boxes", NOPE, "--corpus", "{file}", "--image-root", "{dir}", "--out", "{dir}"],
     "--boxes"),
    (["detector-train", "--data", NOPE], "--data"),
    (["detector-train", "--preset", "vicuna-7b"], "--data"),  # full size: no dataset to train a detector on
    (["train", "--stage", "middle"], "--stage"),
    (["evaluate", "--model", NOPE], "--model"),
    (["evaluate", "--model", "{dir}", "--benchmarks", "pope,nope"], "--benchmarks"),
    (["evaluate", "--model", "{dir}", "--max-workers", "0"], "--max-workers"),
    (["results", "--wait", "soon"], "--wait"),
    (["chat", "--model", "{dir}", "--image", NOPE, "what?"], "--image"),
    (["chat", "--model", "{dir}", "--image", "{file}"], "question"),
    (["convert", "--checkpoint", NOPE, "--llm", "{dir}", "--clip", "{dir}", "--convnext", "{dir}", "--out", "{dir}"],
     "--checkpoint"),
    (["up", "--port", "http"], "--port"),
    (["down", "--everything"], "--everything"),
    (["status", "--last", "some"], "--last"),
    (["config", "--set", "model.nonsense=1"], "model.nonsense"),
    (["config", "--config", NOPE + ".yaml"], "--config"),
    (["show-sample", "--stage", "both"], "--stage"),
    (["ablate", "--variants", "low,everything"], "--variants"),
    # a full-size run's inputs are checked before any Prefect server starts
    (["run", "--preset", "vicuna-7b", *FULL_SIZE_INPUTS, "--set", f"data.finetune_json={NOPE}"],
     "data.finetune_json"),
    (["ablate", "--preset", "vicuna-7b", *FULL_SIZE_INPUTS, "--set", f"detector.model={NOPE}.pt"], "detector.model"),
]


@pytest.mark.parametrize("argv,argument", USER_ERRORS, ids=[" ".join(a[:2]) for a, _ in USER_ERRORS])
def test_a_user_error_is_one_line_naming_the_argument(argv, argument, tmp_path, capsys):
    (tmp_path / "file.json").write_text("[]")
    argv = [a.format(dir=tmp_path, file=tmp_path / "file.json") for a in argv]
    start = time.monotonic()
    assert main(argv) == 2
    seconds = time.monotonic() - start
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and argument in err and "Traceback" not in err, err
    assert err.startswith("mgllava") and out == ""
    assert seconds < 5, f"{seconds:.1f} s before the error"


def test_every_subcommand_has_a_user_error_case():
    [subcommands] = [a for a in build_parser()._actions if a.dest == "command"]
    commands = set(subcommands.choices)
    assert commands == {argv[0] for argv, _ in USER_ERRORS}


def test_user_errors_start_nothing_heavy():
    """`evaluate --model /nope` took 11 s and started a Prefect server: now nothing heavy is imported."""
    code = ("import sys; from mgllava.cli import main\n"
            f"codes = [main(['evaluate', '--model', '{NOPE}']), main(['run', '--set', 'nonsense=1']),\n"
            f"         main(['detect', '--source', '{NOPE}'])]\n"
            "print(codes, sorted(m for m in ('torch', 'prefect', 'flows', 'lmms_eval', 'ultralytics') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[2, 2, 2] []", done.stderr
    assert len(done.stderr.splitlines()) == 3


@pytest.mark.parametrize("argv", [["-v", "status"], ["status", "-v"], ["status", "--verbose"],
                                  ["detect", "import", "--boxes", ".", "--corpus", ".", "--image-root", ".",
                                   "--out", "o", "-v"]])
def test_verbose_before_or_after_the_subcommand(argv):
    assert build_parser().parse_args(argv).verbose is True
    assert getattr(build_parser().parse_args(["status"]), "verbose", False) is False


def test_one_word_per_idea():
    """--quiet, --fresh, --warehouse, --benchmarks a,b and --classes a,b; the old words are gone."""
    parser = build_parser()
    detect = parser.parse_args(["detect", "--quiet", "--fresh", "--classes", "cat, dog", "--warehouse", "w.db"])
    assert (detect.quiet, detect.fresh, detect.classes, detect.warehouse) == (True, True, ["cat", "dog"], "w.db")
    assert parser.parse_args(["train", "--stage", "pretrain", "--quiet", "--fresh"]).quiet
    assert parser.parse_args(["results", "--warehouse", "w.db"]).warehouse == "w.db"
    assert parser.parse_args(["run", "--benchmarks", "pope,gqa", "--fresh"]).benchmarks == ["pope", "gqa"]
    for old in (["detect", "--overwrite"], ["detect", "--no-progress"], ["results", "--db", "w"],
                ["train", "--stage", "pretrain", "--no-progress"], ["run", "--force"]):
        with pytest.raises(SystemExit):
            parser.parse_args(old)


def test_flow_parameters_use_the_same_words():
    """The flows' parameters (what a deployment run is given) use the CLI's words (read from the source)."""
    def is_flow(node: ast.FunctionDef) -> bool:  # @flow(...), or the stage flows' run_stage (flow(...)(run_stage))
        names = {ast.unparse(d.func if isinstance(d, ast.Call) else d) for d in node.decorator_list}
        return "flow" in names or node.name == "run_stage"

    params = {}
    for path in sorted((ROOT / "flows").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and is_flow(node):
                params[node.name] = {a.arg for a in node.args.args + node.args.kwonlyargs}
    assert "fresh" in params["detect_flow"] and "fresh" in params["full_train"] and "fresh" in params["run_stage"]
    assert {"benchmarks", "warehouse"} <= params["evaluate"] and "benchmarks" in params["full_train"]
    assert not set().union(*params.values()) & {"overwrite", "force", "tasks", "db_path", "no_progress"}


def test_run_help_and_validation(capsys):
    assert main(["run", "--help"]) == 0
    assert "in this process" in capsys.readouterr().out
    assert main(["run", "--set", "train.pretrain.lr=fast"]) == 2  # before any flow starts
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.pretrain.lr" in err


def test_prefect_state_lives_under_mgllava_home(monkeypatch, tmp_path):
    import os

    monkeypatch.delenv("PREFECT_HOME", raising=False)
    monkeypatch.setenv("MGLLAVA_HOME", str(tmp_path / "home"))
    assert main(["status"]) == 0
    assert os.environ["PREFECT_HOME"] == str(tmp_path / "home" / "prefect")



def test_status_shows_server_worker_warehouse_and_last_runs(sleeper, tmp_path, capsys, monkeypatch):
    import psutil

    from mgllava import services
    from mgllava.config import load_config
    from warehouse import eval as wh

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    db = tmp_path / "wh.duckdb"
    assert main(["status", "--warehouse", str(db)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["server:    not running (start it with `mgllava up`)", "worker:    not running",
                   f"warehouse: {db} (not created yet)", "last runs: none recorded"]

    wh.record_run_start("eval-1", "/ckpt", load_config(preset="tiny"), ["pope"], None, None, db_path=db)
    process = psutil.Process(sleeper.pid)
    server = {"pid": sleeper.pid, "create_time": process.create_time(), "cmdline": process.cmdline(),
              "api_url": "http://127.0.0.1:9/api"}
    services.state_file().parent.mkdir(parents=True, exist_ok=True)
    services.state_file().write_text(json.dumps({"server": server}))
    assert main(["status", "--warehouse", str(db)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"server:    running (pid {sleeper.pid}) at http://127.0.0.1:9 (not answering)"
    assert out[1] == "worker:    not running" and out[2] == f"warehouse: {db}" and out[3] == "last runs:"
    assert out[4].split() == ["kind", "run", "status", "updated", "what"]
    assert out[6].split()[:3] == ["evaluate", "eval-1", "running"] and out[6].endswith("/ckpt")


def test_up_on_a_taken_port_is_one_line(capsys, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["up", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err == f"mgllava up: error: argument --port: port {port} on 127.0.0.1 is taken by another program: " \
                  "pick another --port\n"


def test_world_follows_the_preset(tmp_path, capsys):
    """`world` takes its defaults from the configuration (the tiny preset: 16 conversations per image)."""
    world = tmp_path / "world"
    assert main(["world", "--set", "shapes.world.n_images=6", "--set", f"shapes.world.dir={world}", "--quiet"]) == 0
    manifest = json.loads((world / "world.json").read_text())
    assert (manifest["n_images"], manifest["conversations_per_image"]) == (6, 16)
    assert str(world) in capsys.readouterr().out


@pytest.mark.slow  # imports the model code (torch, transformers)
def test_evaluate_runs_in_this_process(tmp_path, capsys, monkeypatch):
    """`mgllava evaluate` plans the run in this process (no Prefect): a directory that is not an export
    is one line naming --model, before anything is recorded."""
    monkeypatch.setenv("MGLLAVA_HOME", str(tmp_path / "home"))
    assert main(["evaluate", "--model", str(tmp_path), "--set", f"work_dir={tmp_path / 'w'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mgllava evaluate: error: argument --model:")
    assert "is not an exported MG-LLaVA directory" in err
    assert not (tmp_path / "home" / "warehouse.duckdb").exists() and "prefect" not in err.lower()
