"""The ``squeeze`` command: compile → info → generate on a tiny model, and every error path is
one line on stderr with a non-zero exit status (``--verbose`` raises instead)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from squeeze.apps import cli, needle  # noqa: E402


def _tiny(path, seed: int):
    """A tiny random Llama with the needle tokenizer, saved to ``path``."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=len(needle.WORDS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        bos_token_id=needle.BOS,
        eos_token_id=needle.EOS,
        pad_token_id=needle.PAD,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    needle.build_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    ctx = needle.make_context(np.random.default_rng(0), 600)
    (d / "context.txt").write_text(needle.decode(ctx.ids[1:]))
    key = next(iter(ctx.records))
    (d / "prompts.txt").write_text(f"? {needle.WORDS[key]} :\n? {needle.WORDS[key + 1]} :\n")
    return {
        "dir": d,
        "model": _tiny(d / "model", 0),
        "other": _tiny(d / "other", 1),
        "context": str(d / "context.txt"),
        "prompts": str(d / "prompts.txt"),
        "sqz": str(d / "ctx.sqz"),
    }


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_compile_info_generate_round_trip(files, capsys):
    code, out, _ = _run(
        capsys,
        "compile",
        files["model"],
        files["context"],
        "-o",
        files["sqz"],
        "--window",
        "32",
        "--budget",
        "0.2",
        "--no-progress",
    )
    assert code == 0
    assert "wrote" in out and "squeezed layers" in out

    code, out, _ = _run(capsys, "info", files["sqz"])
    assert code == 0
    assert "context: 600 tokens" in out
    assert "layer 0:" in out and "layer 1:" in out
    assert "budget=0.2" in out and "window=32" in out
    assert (
        "index format: squeeze-index v2" in out and "context format: squeeze-hf-context v2" in out
    )
    assert "calibration points" in out and "verified" not in out  # the header only

    code, out, _ = _run(capsys, "info", files["sqz"], "--verify")
    assert code == 0 and "verified: digests" in out and "calibrated budgets 0.001..1" in out

    code, out, _ = _run(
        capsys,
        "generate",
        files["model"],
        "--context",
        files["sqz"],
        "--prompts",
        files["prompts"],
        "--max-new-tokens",
        "2",
        "--stats",
    )
    assert code == 0
    lines = out.strip().splitlines()
    answers = [s for s in lines if not s.startswith("#")]
    assert len(answers) == 2
    assert all(w in needle.WORD_ID for a in answers for w in a.split())
    assert any("keys read" in s for s in lines if s.startswith("# layer"))

    # a budget of 1.0 reads every key: the answers equal the model's own (dense) greedy answers
    code, out, _ = _run(
        capsys,
        "generate",
        files["model"],
        "--context",
        files["sqz"],
        "--prompt",
        Path(files["prompts"]).read_text().splitlines()[0],
        "--max-new-tokens",
        "1",
        "--budget",
        "1.0",
    )
    assert code == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(files["model"]).eval()
    tok = transformers.AutoTokenizer.from_pretrained(files["model"])
    ids = tok(
        Path(files["context"]).read_text()
        + " "
        + Path(files["prompts"]).read_text().splitlines()[0],
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        want = model(ids).logits[0, -1].argmax().item()
    assert out.strip() == needle.WORDS[want]


def _error_cases(f):
    return {
        "unknown command": ["frobnicate"],
        "compile: missing model": ["compile", str(f["dir"] / "nope"), f["context"], "-o", "x"],
        "compile: missing context": ["compile", f["model"], str(f["dir"] / "nope.txt"), "-o", "x"],
        "compile: bad budget": ["compile", f["model"], f["context"], "-o", "x", "--budget", "2"],
        "compile: bad mode": ["compile", f["model"], f["context"], "-o", "x", "--mode", "fast"],
        "compile: no output": ["compile", f["model"], f["context"]],
        "compile: bad dtype": ["compile", f["model"], f["context"], "-o", "x", "--dtype", "int3"],
        "info: missing file": ["info", str(f["dir"] / "nope.sqz")],
        "info: not an index": ["info", f["context"]],
        "generate: wrong model": ["generate", f["other"], "--context", f["sqz"], "--prompt", "?"],
        "generate: no prompt": ["generate", f["model"], "--context", f["sqz"]],
        "generate: missing prompts file": [
            "generate",
            f["model"],
            "--context",
            f["sqz"],
            "--prompts",
            str(f["dir"] / "nope.txt"),
        ],
        "generate: missing context": [
            "generate",
            f["model"],
            "--context",
            "nope.sqz",
            "--prompt",
            "?",
        ],
        "demo: bad budget": ["demo", "--budget", "0"],
        "demo: bad budgets": ["demo", "--budgets", "a,b"],
        "demo: missing context file": ["demo", "--context-file", str(f["dir"] / "nope.txt")],
        "demo: missing model": ["demo", "--model", str(f["dir"] / "nope")],
    }


CASES = list(
    _error_cases({"dir": Path("/"), **dict.fromkeys(["model", "other", "context", "sqz"])})
)


@pytest.mark.parametrize("case", CASES)
def test_error_is_one_line(files, capsys, case):
    if case.startswith("generate") and not (files["dir"] / "ctx.sqz").exists():
        cli.main(["compile", files["model"], files["context"], "-o", files["sqz"], "--no-progress"])
        capsys.readouterr()
    code, _, err = _run(capsys, *_error_cases(files)[case])
    assert code != 0
    msgs = [s for s in err.splitlines() if s.startswith("squeeze")]
    assert len(msgs) == 1, err
    assert msgs[0].startswith("squeeze: error: ")
    assert "Traceback" not in err


def test_verbose_shows_the_traceback(files):
    with pytest.raises(FileNotFoundError):
        cli.main(["--verbose", "info", str(files["dir"] / "nope.sqz")])


def test_help_and_registry(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for path in cli.COMMANDS:
        assert "squeeze " + " ".join(path) in out
    for sub in (
        "demo",
        "compile",
        "generate",
        "info",
        "bench kmeans",
        "bench vllm",
        "bench fidelity",
    ):
        assert sub in out


def test_bench_vllm_missing_is_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "squeeze" / "apps" / "cli.py"))
    code, _, err = _run(capsys, "bench", "vllm")
    assert code == 1
    assert err.count("\n") == 1 and "bench_vllm.py not found" in err


# ---- issue 14, defect 10: the file errors ------------------------------------------------------


def _error(capsys, *argv) -> str:
    code, _, err = _run(capsys, *argv)
    assert code != 0 and "Traceback" not in err
    return err.strip()


def test_compile_checks_the_output_before_compiling(files, capsys):
    missing = files["dir"] / "no" / "such" / "ctx.sqz"
    code, out, err = _run(capsys, "compile", files["model"], files["context"], "-o", str(missing))
    assert code != 0 and "model loaded" not in out  # refused before the model was even loaded
    assert str(missing) in err and "does not exist" in err
    err = _error(capsys, "compile", files["model"], files["context"], "-o", str(files["dir"]))
    assert "is a directory" in err


def test_file_errors_name_the_file(files, capsys):
    bad = files["dir"] / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 10)
    err = _error(capsys, "compile", files["model"], str(bad), "-o", str(files["dir"] / "x.sqz"))
    assert str(bad) in err and "not UTF-8" in err
    d = str(files["dir"])
    assert "is a directory" in _error(capsys, "info", d)
    assert "is a directory" in _error(capsys, "compile", files["model"], d, "-o", "x.sqz")
    err = _error(capsys, "generate", files["model"], "--context", d, "--prompt", "?")
    assert "is a directory" in err and d in err
    garbage = files["dir"] / "garbage.sqz"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    assert str(garbage) in _error(capsys, "info", str(garbage))


def test_info_describes_core_api_indexes(files, capsys, gen):
    import squeeze

    keys, values = torch.randn(2, 300, 16, generator=gen), torch.randn(2, 300, 16, generator=gen)
    cfg = squeeze.SqueezeConfig(window=20, mode="topk", kmeans_iters=2)
    path = files["dir"] / "core.sqz"
    squeeze.save_indexes(path, [squeeze.build_index(keys, values, cfg)] * 2)
    code, out, _ = _run(capsys, "info", str(path), "--verify")
    assert code == 0 and "index file (core API): 2 layers" in out
    assert "layer 0: 2 KV heads x 300 keys (4 sinks, window 20)" in out and "layer 1:" in out
    assert "clusters (BF16 centroids)" in out  # the default centroid_dtype
    assert "window=20" in out and "verified" in out


def test_info_reads_only_the_header_unless_verify(files, capsys):
    if not Path(files["sqz"]).exists():
        cli.main(["compile", files["model"], files["context"], "-o", files["sqz"], "--no-progress"])
    data = bytearray(Path(files["sqz"]).read_bytes())
    data[-5] ^= 0xFF  # tensor data, not the header
    bad = files["dir"] / "flipped.sqz"
    bad.write_bytes(bytes(data))
    code, out, _ = _run(capsys, "info", str(bad))
    assert code == 0 and "layer 0:" in out
    assert "checksum mismatch" in _error(capsys, "info", str(bad), "--verify")


def test_generate_refuses_an_edited_context(files, capsys):
    """Issue 14, defect 5: another context's ids and length written into the header, every
    digest recomputed: ``generate`` refuses it instead of answering with the other context."""
    from file_tools import rewrite

    from squeeze.fingerprints import context_digest

    if not Path(files["sqz"]).exists():
        cli.main(["compile", files["model"], files["context"], "-o", files["sqz"], "--no-progress"])
    n = 600 - 23

    def other_context(header):
        meta = header["metadata"]
        meta["context_ids"] = meta["context_ids"][:n]
        meta["context_len"] = n
        meta["context_sha256"] = context_digest(torch.tensor(meta["context_ids"]))

    bad = rewrite(files["sqz"], files["dir"] / "edited.sqz", header_fn=other_context)
    err = _error(capsys, "generate", files["model"], "--context", str(bad), "--prompt", "? a :")
    assert str(bad) in err and f"context_len is {n}" in err
