"""Every `baton` command given a bad file (policy, trace, capacity profile, settings YAML, chat template, model
directory) answers with clear lines naming the file, exit code 2 and no traceback: run as the real command."""
from __future__ import annotations

import gzip
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
POLICY = REPO / "deploy" / "policies" / "spike.yaml"
TRACE = REPO / "deploy" / "policies" / "traces" / "spike_5x.csv.gz"
GARBAGE = b"\xff\xfe\x00\x01 not text {{{ \x80"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, pathlib.Path]:
    """Bad files of every kind, and a bad copy of a real model directory for each way it can be broken."""
    from baton.devtools.make_model import make_model

    d = tmp_path_factory.mktemp("bad")
    out = {"missing": d / "missing.yaml", "dir": d / "a_directory"}
    out["dir"].mkdir()
    for name, content in {"garbage.yaml": GARBAGE, "list.yaml": b"- 1\n- 2\n", "empty.yaml": b"",
                          "unclosed.yaml": b"key: [1, 2\n", "unknown_key.yaml": b"no_such_setting: 1\n",
                          "bad_field.yaml": b"version: 1\nclusters: 5\n", "garbage.csv": GARBAGE,
                          "header.csv": b"a,b,c\n1,2,3\n", "garbage.json": GARBAGE, "list.json": b"[1]",
                          "values.csv": b"timestamp,region,prompt_tokens,output_tokens\n0.1,us-east,many,5\n",
                          "region.csv": b"timestamp,region,prompt_tokens,output_tokens\n0.1,mars,10,5\n",
                          "not_gzip.csv.gz": b"timestamp,region\n"}.items():
        (d / name).write_bytes(content)
        out[name] = d / name
    out["bad_gzip"] = d / "bad.csv.gz"
    out["bad_gzip"].write_bytes(gzip.compress(b"timestamp,region,prompt_tokens,output_tokens\n0.1,us-east,1,1\n")[:20])
    model = make_model(d / "good_model", arch="llama", layers=1, hidden=32, heads=2, kv_heads=1, vocab=300, seed=1)
    for name, damage in {"no_config": lambda m: (m / "config.json").unlink(),
                         "garbage_config": lambda m: (m / "config.json").write_bytes(GARBAGE),
                         "arch_config": lambda m: (m / "config.json").write_text('{"architectures": ["Nope"]}'),
                         "no_weights": lambda m: [p.unlink() for p in m.glob("*.safetensors")],
                         "garbage_weights": lambda m: [p.write_bytes(GARBAGE) for p in m.glob("*.safetensors")],
                         "no_tokenizer": lambda m: (m / "tokenizer.json").unlink()}.items():
        broken = d / f"model_{name}"
        shutil.copytree(model, broken)
        damage(broken)
        out[f"model_{name}"] = broken
    return out


def _cases() -> list[tuple[str, list[str], str]]:
    """(case id, argv after `baton`, the key of the file its answer must name)."""
    cases = []
    for bad in ("missing", "dir", "garbage.yaml", "list.yaml", "empty.yaml", "unclosed.yaml", "bad_field.yaml"):
        cases.append((f"policy-check-{bad}", ["policy", "check", "{%s}" % bad], bad))
        cases.append((f"controlplane-policy-{bad}", ["controlplane", "--policy", "{%s}" % bad, "--insecure"], bad))
    for bad in ("missing", "garbage.yaml", "list.yaml"):
        cases.append((f"simulate-policy-{bad}", ["policy", "simulate", "{%s}" % bad, "--trace", str(TRACE)], bad))
    for bad in ("missing", "dir", "garbage.csv", "header.csv", "values.csv", "region.csv", "not_gzip.csv.gz",
                "bad_gzip"):
        cases.append((f"simulate-trace-{bad}", ["policy", "simulate", str(POLICY), "--trace", "{%s}" % bad], bad))
    for bad in ("missing", "garbage.json", "list.json"):
        cases.append((f"simulate-capacity-{bad}", ["policy", "simulate", str(POLICY), "--trace", str(TRACE),
                                                   "--capacity-json", "{%s}" % bad], bad))
    for command in ("router", "decode-worker", "prefill-worker", "controlplane"):
        for bad in ("missing", "garbage.yaml", "list.yaml", "unclosed.yaml", "unknown_key.yaml"):
            extra = ["--policy", str(POLICY)] if command == "controlplane" else ["--model", "{model_no_weights}"]
            cases.append((f"{command}-config-{bad}", [command, "--config", "{%s}" % bad, *extra], bad))
    for model in ("missing", "dir", "model_no_config", "model_garbage_config", "model_arch_config",
                  "model_no_weights", "model_garbage_weights", "model_no_tokenizer"):
        cases.append((f"generate-{model}", ["generate", "{%s}" % model, "--prompt", "hi", "--max-tokens", "1"],
                      model))
        if model not in ("model_no_weights", "model_garbage_weights"):  # the router reads no weights
            cases.append((f"router-model-{model}", ["router", "--model", "{%s}" % model, "--redis-url",
                                                    "redis://127.0.0.1:1/0"], model))
        cases.append((f"decode-worker-model-{model}", ["decode-worker", "--model", "{%s}" % model, "--redis-url",
                                                       "redis://127.0.0.1:1/0", "--device", "cpu"], model))
        cases.append((f"up-model-{model}", ["up", "--model", "{%s}" % model, "--port", "1"], model))
    cases.append(("router-chat-template-missing", ["router", "--model", "{model_no_weights}", "--chat-template",
                                                   "{missing}"], "missing"))
    return cases


CASES = _cases()


def _answer(argv: list[str]) -> tuple[int, str, BaseException | None]:
    """Runs `baton ARGV` in this process (the real typer app): exit code, everything printed, an escaped exception."""
    from typer.testing import CliRunner

    from baton.cli import app

    result = CliRunner().invoke(app, argv)
    out = result.output + (result.stderr if result.stderr_bytes is not None and result.stderr not in result.output
                           else "")
    escaped = result.exception if not isinstance(result.exception, SystemExit) else None
    return result.exit_code, out, escaped


def _problems(code: int, out: str, escaped: BaseException | None, named: pathlib.Path) -> list[str]:
    problems = []
    if code != 2:
        problems.append(f"exit code {code}")
    if escaped is not None or "Traceback" in out:
        problems.append(f"a traceback ({escaped!r})")
    if str(named) not in out and named.name not in out:
        problems.append(f"no line names {named.name}")
    return problems


def _argv(argv: list[str], files: dict[str, pathlib.Path]) -> list[str]:
    return [str(files[a[1:-1]]) if a.startswith("{") and a.endswith("}") else a for a in argv]


def test_every_command_refuses_bad_files_with_clear_lines(files):
    problems = []
    for name, argv, key in CASES:
        code, out, escaped = _answer(_argv(argv, files))
        found = _problems(code, out, escaped, files[key])
        if found:
            problems.append(f"{name}: {', '.join(found)}:\n    " + "\n    ".join(out.strip().splitlines()[-6:]))
    assert not problems, f"{len(problems)} of {len(CASES)} cases:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", ["policy-check-garbage.yaml", "simulate-trace-region.csv",
                                  "decode-worker-model-model_garbage_weights", "up-model-model_no_tokenizer"])
def test_the_real_command_prints_one_line_and_exits_2(files, name):
    """The same as a separate process, as a user runs it: what reaches the terminal, and the exit status."""
    _, argv, key = next(c for c in CASES if c[0] == name)
    done = subprocess.run([sys.executable, "-m", "baton.cli", *_argv(argv, files)], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    out = (done.stderr + done.stdout).strip()
    assert not _problems(done.returncode, out, None, files[key]), out
    assert len(out.splitlines()) == 1, out
