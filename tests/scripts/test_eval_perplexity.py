"""scripts/eval_perplexity.py: stride bookkeeping, the golden stories260K NLL, agreement with transformers, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import jaxinfer

from script_loader import load_script


ep = load_script("eval_perplexity")


def hf_doc_windows(seq_len, max_length, stride):
    """The (begin, end, trg_len) triples of the loop in the transformers docs, verbatim."""
    out, prev_end_loc = [], 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        out.append((begin_loc, end_loc, trg_len))
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return out


@pytest.mark.parametrize("n, window, stride", [
    (2, 2, 1), (10, 4, 1), (10, 4, 3), (100, 16, 5), (100, 16, 8), (97, 16, 15), (64, 16, 16), (65, 16, 16),
    (5, 16, 8), (16, 16, 4), (17, 16, 4),
])
def test_stride_windows_are_hfs_and_score_each_token_once(n, window, stride):
    windows = ep.stride_windows(n, window, stride)
    hf = hf_doc_windows(n, window, stride)
    assert [(w.begin, w.end) for w in windows] == [(b, e) for b, e, _ in hf]
    scored = []
    for w, (_, _, trg_len) in zip(windows, hf):
        assert w.begin + 1 <= w.score_start <= w.end  # every target has context inside its window
        # HF's labels: the last trg_len tokens, minus the window's first token (lost to the label shift).
        assert w.num_scored == trg_len - (trg_len == w.end - w.begin)
        scored += range(w.score_start, w.end)
    if stride < window or len(windows) == 1:
        assert sorted(scored) == list(range(1, n))  # each token but the first, exactly once
    else:  # non-overlapping windows: each window's first token has no context
        assert sorted(scored) == sorted(set(range(1, n)) - {w.begin for w in windows})
    if window >= n:
        assert [(w.begin, w.end) for w in windows] == [(0, n)]


@pytest.mark.parametrize("n, window, stride, batch", [(50, 8, 3, 4), (50, 8, 8, 3), (7, 32, 4, 2), (33, 8, 7, 100)])
def test_sliding_window_nll_bookkeeping_with_a_fake_scorer(n, window, stride, batch):
    # Token id = its position, and the fake scorer's "NLL" of a target is its id: the total is then
    # the sum of the scored positions, the count their number.
    shapes = []

    def fake(tokens):
        shapes.append(tokens.shape)
        return tokens[:, 1:].astype(np.float32)

    res = ep.sliding_window_nll(fake, np.arange(n), window, stride, batch)
    windows = ep.stride_windows(n, window, stride)
    expected = [p for w in windows for p in range(w.score_start, w.end)]
    assert res["tokens"] == len(expected) and res["total_nll"] == sum(expected)
    assert res["windows"] == len(windows) and res["nll"] == pytest.approx(sum(expected) / len(expected))
    assert res["perplexity"] == pytest.approx(math.exp(res["nll"]))
    if stride < window:
        assert res["tokens"] == n - 1 and res["total_nll"] == n * (n - 1) // 2
    assert len(set(shapes)) == 1 and shapes[0] == (min(batch, len(windows)), min(window, n))  # one shape


@pytest.mark.parametrize("window, stride, batch", [(1, 1, 1), (8, 9, 1), (8, 0, 1), (8, 4, 0)])
def test_bad_settings_are_rejected(window, stride, batch):
    with pytest.raises(ValueError, match="--window|--stride|--batch"):
        ep.sliding_window_nll(lambda t: t, np.arange(20), window, stride, batch)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        ep.stride_windows(1, 8, 4)


def test_evaluate_equals_unpadded_per_window_forward(tiny_model):
    # Batching + padding to one shape must not change anything: reference = each window on its own,
    # unpadded, log-softmax in float64 on the host.
    ids = np.random.default_rng(0).integers(0, tiny_model.config.vocab_size, 45)
    window, stride = 16, 6
    total, count = 0.0, 0
    for w in ep.stride_windows(len(ids), window, stride):
        logits = np.asarray(jaxinfer.forward(tiny_model, ids[None, w.begin:w.end]), np.float64)[0]
        shifted = logits - logits.max(-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        for p in range(w.score_start, w.end):
            total -= logp[p - w.begin - 1, ids[p]]
            count += 1
    res = ep.evaluate(tiny_model, ids, window, stride, batch=3)
    assert res["tokens"] == count == len(ids) - 1
    assert res["nll"] == pytest.approx(total / count, rel=1e-6)
    with pytest.raises(ValueError, match="token ids"):
        ep.evaluate(tiny_model, [0, tiny_model.config.vocab_size], window, stride, batch=1)


@pytest.fixture(scope="module")
def stories(assets_dir):
    model_dir = assets_dir / "stories260K"
    text = assets_dir / "text" / "tinyshakespeare.txt"
    ids, prepended = ep.load_token_ids(model_dir, text, 1536)
    return model_dir, text, ids, prepended, jaxinfer.load_model(model_dir, dtype="float32")


def test_golden_shakespeare_first512(stories):
    model_dir, _, ids, prepended, model = stories
    golden = json.loads((model_dir / "golden.json").read_text())["shakespeare_first512"]
    assert prepended and ids[:512] == golden["token_ids"]  # the tokenizer adds no BOS: the script does
    res = ep.evaluate(model, ids[:512], window=512, stride=512, batch=1)
    assert res["tokens"] == 511 and res["windows"] == 1
    assert res["nll"] == pytest.approx(3.900033, abs=1e-3)
    assert res["nll"] == pytest.approx(golden["mean_nll_ref"], rel=1e-5)
    assert res["perplexity"] == pytest.approx(golden["ppl_ref"], rel=1e-4)


def test_sliding_window_matches_transformers(stories):
    model_dir, _, ids, _, model = stories
    res = ep.evaluate(model, ids, window=256, stride=128, batch=8)
    hf = ep.hf_evaluate(model_dir, ids, window=256, stride=128)
    assert res["tokens"] == hf["tokens"] == len(ids) - 1
    assert res["windows"] == hf["windows"] == 11
    assert abs(res["nll"] - hf["nll"]) / hf["nll"] < 1e-4


def test_cli_end_to_end(stories, tmp_path, capsys):
    model_dir, text, ids, _, _ = stories
    out = tmp_path / "sub" / "ppl.json"
    ep.main(["--model", str(model_dir), "--text", str(text), "--max-tokens", "600", "--window", "256",
             "--stride", "128", "--batch", "8", "--compare-hf", "--no-progress", "--json", str(out)])
    data = json.loads(out.read_text())
    for key in ("nll", "perplexity", "tokens", "windows", "hf_nll", "hf_perplexity", "rel_diff"):
        assert key in data, key
    assert data["tokens"] == 599 and data["windows"] == 4 and data["rel_diff"] < 1e-4
    assert data["perplexity"] == pytest.approx(math.exp(data["nll"]))
    printed = capsys.readouterr().out
    assert "jaxinfer" in printed and "transformers" in printed and "relative difference" in printed


@pytest.mark.parametrize("extra, message", [
    (["--window", "8", "--stride", "9"], "must not exceed --window"),
    (["--window", "1"], "--window must be at least 2"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--max-tokens", "1"], "--max-tokens must be at least 2"),
    (["--window", "4096", "--stride", "2048", "--text", "/nonexistent.txt"], "no such file"),
])
def test_cli_rejects_bad_arguments(assets_dir, capsys, extra, message):
    argv = ["--model", str(assets_dir / "stories260K"), "--text", str(assets_dir / "text" / "tinyshakespeare.txt")]
    with pytest.raises(SystemExit) as exc:
        ep.main(argv + extra)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_cli_rejects_missing_model(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ep.main(["--model", str(tmp_path), "--text", str(tmp_path / "t.txt")])
    assert "no config.json" in capsys.readouterr().err


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        ep.main(["--help"])
    assert exc.value.code == 0 and "stride method" in capsys.readouterr().out
