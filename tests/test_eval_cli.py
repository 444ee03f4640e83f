"""The tiny-turboquant-eval and tiny-turboquant-validate commands: bad input gives one line and a non-zero exit;
small real runs write the JSON report."""
import json, shutil, subprocess, sys
import pytest


def run(cmd, *args):
    exe = shutil.which(cmd)
    entry = "eval_main" if cmd.endswith("eval") else "validate_main"
    argv = [exe] if exe else [sys.executable, "-c", f"import sys; from tiny_turboquant.eval import {entry}; {entry}(sys.argv[1:])"]
    return subprocess.run(argv + [str(a) for a in args], capture_output=True, text=True, timeout=600)


class Result:
    def __init__(self, returncode, stdout, stderr): self.returncode, self.stdout, self.stderr = returncode, stdout, stderr
    def __repr__(self): return f"exit {self.returncode}: {self.stderr}"


@pytest.fixture
def call(capsys):
    "Run a command's main function in this process (much faster than a subprocess): exit code, stdout, stderr."
    from tiny_turboquant.eval import eval_main, validate_main
    def go(cmd, *args):
        main = eval_main if cmd.endswith("eval") else validate_main
        try: main([str(a) for a in args]); code = 0
        except SystemExit as e: code = e.code
        out = capsys.readouterr()
        return Result(code, out.out, out.err)
    return go


def assert_one_line_error(r, *needles):
    err = r.stderr.strip()
    assert r.returncode != 0, r
    assert "Traceback" not in r.stderr, r.stderr
    assert len(err.splitlines()) == 1, err
    assert err.startswith("tiny-turboquant-"), err
    for n in needles: assert n in err, err


def test_console_script_bad_input():
    "Through the installed entry point, in a fresh process: one line, non-zero exit, nothing on stdout."
    r = run("tiny-turboquant-eval", "--compression", "fast")
    assert_one_line_error(r, "unknown method 'fast'")
    assert r.stdout == ""


@pytest.mark.parametrize("args, needles", [
    (["--compression", "fast"], ["unknown method 'fast'"]),
    (["--key-bits", "5"], ["key_bits must be one of (2, 3, 4)"]),
    (["--context", "512", "--prefix", "512"], ["shorter than --prefix 512 + --chunk 64"]),
    (["--chunk", "256"], ["longer than the cache's full-precision window"]),
    (["--peer", "vllm"], ["unknown --peer 'vllm'"]),
    (["--task", "mmlu"], ["--task takes"]),
    (["--text", "wikitext2"], ["--text-file"]),
    (["--text-file", "/nonexistent/text.txt"], ["does not exist"]),
    (["--context", "abc"], ["invalid int value"]),
])
def test_eval_bad_input(call, args, needles):
    assert_one_line_error(call("tiny-turboquant-eval", *args), *needles)


def test_eval_bad_model_and_text(call, tmp_path):
    assert_one_line_error(call("tiny-turboquant-eval", "--model", tmp_path / "no-such-model", "--text", "pydoc"), "cannot load model")
    empty = tmp_path / "empty.txt"; empty.write_text("  \n")
    assert_one_line_error(call("tiny-turboquant-eval", "--text-file", empty), "is empty")
    short = tmp_path / "short.txt"; short.write_text("A few words of text.")
    assert_one_line_error(call("tiny-turboquant-eval", "--text-file", short), "fewer than one window")


def test_validate_bad_input(call, tmp_path):
    assert_one_line_error(call("tiny-turboquant-validate", "--compression", "tiny"), "unknown method 'tiny'")
    assert_one_line_error(call("tiny-turboquant-validate", "--prompts", tmp_path / "none.txt"), "does not exist")
    (tmp_path / "blank.txt").write_text("---\n\n---\n")
    assert_one_line_error(call("tiny-turboquant-validate", "--prompts", tmp_path / "blank.txt"), "holds no prompt")
    assert_one_line_error(call("tiny-turboquant-validate", "--max-new-tokens", "0"), "positive")


def test_eval_small_run_writes_report(tmp_path):
    out = tmp_path / "r.json"
    r = run("tiny-turboquant-eval", "--text", "pydoc", "--compression", "safe,k2v2", "--peer", "quanto:4",
            "--context", 384, "--prefix", 128, "--chunk", 64, "--max-tokens", 200, "--ratio-context", 512, "--quiet", "--out", out)
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    h = rep["harness_check"]
    assert h["passed"] and h["relative_error"] < 1e-4 and h["destroyed_over_one_pass"] > 1.5
    assert len(rep["text"]["sha256"]) == 64 and rep["versions"]["torch"] and rep["seconds"] > 0
    assert rep["baseline"]["scored_tokens"] == 255 and rep["protocol"]["windows"] == 1
    rows = {x["name"]: x for x in rep["results"]}
    names = set(rows) | {s["name"] for s in rep["skipped"]}
    assert names == {"safe", "K2/V2", "quanto int4"}
    for row in rows.values():
        assert row["scored_tokens"] == 255 and row["kl"] > 0 and row["held_bytes"] < row["uncompressed_bytes"]
        assert row["ratio_context"] == 512 and row["ratio_at_context"] > 1.5
    assert rows["safe"]["kl"] < rows["K2/V2"]["kl"]
    assert "| safe (tiny) | 4/4 |" in r.stdout and "harness check passed" in r.stdout


def test_validate_small_run(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Write one sentence about the sea.\n---\n" + "The quick brown fox jumps over the lazy dog. " * 40 + "\nWhat did the fox do?\n")
    out = tmp_path / "v.json"
    r = run("tiny-turboquant-validate", "--compression", "aggressive", "--prompts", prompts, "--max-new-tokens", 12, "--out", out)
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep["prompts"] == 2 and rep["method"] == "aggressive"
    for row in rep["rows"]:
        assert 1 <= row["generated"] <= 12 and 0 <= row["agreement"] <= 1 and row["kl_mean"] >= 0
        assert 0 <= row["first_divergence"] <= row["generated"]
    assert rep["rows"][1]["prompt_tokens"] > 300 and rep["rows"][1]["ratio"] > 1
    assert "first divergence" in r.stdout
