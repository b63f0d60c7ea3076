"""Tests for jaxinfer.tokenizer: HF-exact encoding, special ids, and streaming detokenization."""

import functools
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxinfer.tokenizer import ByteTokenizer, IncrementalDetokenizer, Tokenizer, load_tokenizer

ASSETS = Path(__file__).resolve().parents[2].parent / "shared" / "assets"
FFFD = "\ufffd"
MULTIBYTE = "héllo 世界 🙂 naïve"

# Valid text that cannot legitimately decode to U+FFFD, so any U+FFFD in a chunk is a split character.
chars = st.characters(exclude_categories=("Cs",), exclude_characters=FFFD)
texts = st.text(chars, max_size=40)


@functools.cache
def asset_tokenizer(name: str) -> Tokenizer:
    # A cache rather than a fixture: hypothesis tests may not use function-scoped fixtures.
    path = ASSETS / name
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"asset {path}/tokenizer.json not found (expected the shared assets next to the repo)")
    return Tokenizer.from_dir(path)


def auto_tokenizer(name: str):
    transformers = pytest.importorskip("transformers")
    asset_tokenizer(name)  # skips if absent
    return transformers.AutoTokenizer.from_pretrained(str(ASSETS / name))


def stream(tok, prompt, gen, sizes=None):
    """Pushes `gen` after `prompt` (one id per push, or `sizes`-long batches); returns (chunks, detok)."""
    detok = tok.detokenizer(prompt)
    chunks, i = [], 0
    for n in sizes or [1] * len(gen):
        chunks.append(detok.push(gen[i : i + n]))
        i += n
    chunks.append(detok.push(gen[i:]))
    chunks.append(detok.flush())
    return chunks, detok


def expected_stream(tok, prompt, gen):
    """decode(P + G) minus decode(P), or None where that difference is not well-defined."""
    full, head = tok.decode([*prompt, *gen]), tok.decode(prompt)
    return full[len(head) :] if full.startswith(head) else None


def assert_clean_stream(tok, prompt, gen, sizes=None):
    chunks, detok = stream(tok, prompt, gen, sizes)
    for chunk in chunks:
        assert FFFD not in chunk, f"split character in chunk {chunk!r} of {chunks}"
        chunk.encode("utf-8")  # no lone surrogates
    assert "".join(chunks) == detok.text == expected_stream(tok, prompt, gen)
    return chunks


# --- tokenizer.json assets ---------------------------------------------------------------------------


def test_stories260k_matches_hf_and_golden_ids():
    tok = asset_tokenizer("stories260K")
    text = "Once upon a time"
    ids = tok.encode(text)
    assert ids == auto_tokenizer("stories260K")(text)["input_ids"]
    assert (tok.bos_id, tok.eos_ids, tok.vocab_size) == (1, (2,), 512)
    # This tokenizer.json's post-processor is a bare "$A": no BOS, as in HF. The golden greedy run starts
    # from an explicit BOS, so the caller prepends it (`[bos_id] + encode(...)`).
    golden = json.loads((ASSETS / "stories260K" / "golden.json").read_text())
    assert [tok.bos_id, *ids] == golden["greedy_from_bos_255"][: len(ids) + 1]
    assert tok.decode(ids) == text
    assert tok.decode(golden["greedy_from_bos_255"]).startswith(golden["greedy_text"][:40])


def test_byte_level_bpe_adds_bos_like_hf():
    tok = asset_tokenizer("quant_oracles/base")
    for text in ["Once upon a time", MULTIBYTE, ""]:
        ids = tok.encode(text)
        assert ids == auto_tokenizer("quant_oracles/base")(text)["input_ids"]
        assert ids[0] == tok.bos_id == 1
        assert tok.encode(text, add_special_tokens=False) == ids[1:]
        assert tok.decode(ids) == text
    assert tok.eos_ids == (2,)


def test_llama2_adds_no_bos_like_hf():
    tok = asset_tokenizer("llama2_tokenizer")
    hf = auto_tokenizer("llama2_tokenizer")
    for text in ["Once upon a time", MULTIBYTE]:
        assert tok.encode(text) == hf(text)["input_ids"]
        assert tok.bos_id not in tok.encode(text)
    # No generation_config here: ids come from tokenizer_config's token strings.
    assert (tok.bos_id, tok.eos_ids, tok.vocab_size) == (1, (2,), 32000)


@pytest.mark.parametrize("name", ["llama2_tokenizer", "stories260K", "quant_oracles/base"])
def test_multibyte_stream_keeps_spaces_and_characters(name):
    tok = asset_tokenizer(name)
    prompt_text = "Translate:"
    full = tok.encode(f"{prompt_text} {MULTIBYTE}")
    split = next(k for k in range(len(full)) if tok.decode(full[:k]) == prompt_text)
    prompt, gen = full[:split], full[split:]
    # The first generated token's space survives only with the prompt as context.
    assert "".join(assert_clean_stream(tok, prompt, gen)) == " " + MULTIBYTE
    # Without a prompt, the stream matches a plain decode (which drops a sentencepiece leading space).
    gen_only = tok.encode(MULTIBYTE, add_special_tokens=False)
    assert "".join(assert_clean_stream(tok, [], gen_only)) == tok.decode(gen_only) == MULTIBYTE
    # Multi-id pushes whose last id stops mid-character must still emit what precedes it.
    assert "".join(assert_clean_stream(tok, prompt, gen, sizes=[3] * (len(gen) // 3))) == " " + MULTIBYTE


@pytest.mark.parametrize("name", ["llama2_tokenizer", "quant_oracles/base"])
def test_prompt_split_anywhere(name):
    """Even a prompt ending mid-character streams the rest of the text, that character included."""
    tok = asset_tokenizer(name)
    full = tok.encode(f"a {MULTIBYTE} b 🙂🙂", add_special_tokens=False)
    assert len(full) > 10
    text = tok.decode(full)
    for k in range(len(full) + 1):
        chunks, detok = stream(tok, full[:k], full[k:])
        assert all(FFFD not in c for c in chunks), (k, chunks)
        # The prompt's complete characters end at its last character boundary: the longest clean prefix.
        # (Not decode(prompt) minus U+FFFDs: byte fallback garbles a whole byte run if it ends mid-character.)
        prompt_text = next(t for j in range(k, -1, -1) if FFFD not in (t := tok.decode(full[:j])))
        assert prompt_text + detok.text == text, k


def test_special_tokens_skipped_in_stream():
    tok = asset_tokenizer("llama2_tokenizer")
    gen = [*tok.encode("Hi"), *tok.eos_ids, *tok.encode("there"), tok.bos_id, *tok.encode("you")]
    assert assert_clean_stream(tok, [tok.bos_id], gen) == ["Hi", "", " there", "", " you", "", ""]


@pytest.mark.parametrize("name", ["llama2_tokenizer", "quant_oracles/base"])
@settings(max_examples=50, deadline=None)
@given(text=texts, data=st.data())
def test_stream_random_text(name, text, data):
    tok = asset_tokenizer(name)
    ids = tok.encode(text)
    split = data.draw(st.integers(0, len(ids)), label="prompt length")
    if tok.decode(ids[:split]).endswith(FFFD):
        return  # prompt ends mid-character: covered by test_prompt_split_anywhere
    assert_clean_stream(tok, ids[:split], ids[split:])


@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_byte_level_stream_any_ids(data):
    """For byte-level BPE the invariant holds for arbitrary ids, garbage bytes and specials included."""
    tok = asset_tokenizer("quant_oracles/base")
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=30), label="ids")
    split = data.draw(st.integers(0, len(ids)), label="prompt length")
    expected = expected_stream(tok, ids[:split], ids[split:])
    if expected is not None:
        assert "".join(stream(tok, ids[:split], ids[split:])[0]) == expected


# --- ByteTokenizer ----------------------------------------------------------------------------------


def test_byte_tokenizer_basics():
    tok = ByteTokenizer()
    assert (tok.bos_id, tok.eos_ids, tok.vocab_size) == (256, (257,), 258)
    assert tok.encode("hé") == [256, 104, 0xC3, 0xA9]
    assert tok.encode("hé", add_special_tokens=False) == [104, 0xC3, 0xA9]
    assert tok.decode([256, 104, 0xC3, 0xA9, 257]) == "hé"
    assert tok.decode([256, 104, 257], skip_special_tokens=False) == "<s>h</s>"


def test_byte_flush_emits_replacement_for_incomplete_char():
    detok = ByteTokenizer().detokenizer([256])
    assert detok.push(b"ok \xf0\x9f") == "ok "
    assert detok.push([0x99]) == ""  # 3 of the 4 bytes of an emoji: held back
    assert detok.flush() == FFFD
    assert detok.text == "ok " + FFFD
    assert detok.flush() == ""


@settings(max_examples=100, deadline=None)
@given(text=st.text(st.sampled_from("aé世🙂 ") | chars, max_size=30), data=st.data())
def test_byte_stream_random_text(text, data):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    split = data.draw(st.integers(0, len(ids)), label="prompt length")
    sizes = data.draw(st.lists(st.integers(1, 5), max_size=len(ids)), label="push sizes")
    chunks, detok = stream(tok, ids[:split], ids[split:], sizes)
    assert all(FFFD not in c for c in chunks), chunks
    # A prompt split mid-emoji decodes to U+FFFD for its partial bytes; the stream supplies the whole emoji.
    assert tok.decode(ids[:split]).rstrip(FFFD) + detok.text == text


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(max_size=30))
def test_byte_stream_any_bytes_matches_decode(raw):
    tok = ByteTokenizer()
    ids = [*raw, 257]
    assert "".join(stream(tok, [256], ids)[0]) == tok.decode(ids) == raw.decode("utf-8", errors="replace")


# --- loading -----------------------------------------------------------------------------------------


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json in .*" + tmp_path.name):
        Tokenizer.from_dir(tmp_path)
    assert load_tokenizer(tmp_path) is None


def _write_word_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "hello", "world", "<eot>"])}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>", "<eot>"])
    tok.save(str(path / "tokenizer.json"))


def test_special_ids_precedence(tmp_path):
    _write_word_tokenizer(tmp_path)
    write = lambda name, obj: (tmp_path / name).write_text(json.dumps(obj))  # noqa: E731
    # Only config.json: its ids are the fallback.
    write("config.json", {"bos_token_id": 1, "eos_token_id": 2})
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_ids, tok.vocab_size) == (1, (2,), 6)
    # tokenizer_config token strings (AddedToken dicts too) win over config.json.
    write("tokenizer_config.json", {"bos_token": "hello", "eos_token": {"content": "<eot>"}})
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_ids) == (3, (5,))
    # generation_config comes first; eos ids are the de-duplicated union.
    write("generation_config.json", {"bos_token_id": 4, "eos_token_id": [2, 5, 2]})
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_ids) == (4, (2, 5))
    assert tok.decode(tok.encode("hello <eot> world")) == "hello world"


def test_accepts_numpy_ids():
    # The engine hands over arrays of numpy ints, which are neither Sequences nor ints.
    np = pytest.importorskip("numpy")
    tok = ByteTokenizer()
    ids = np.array(tok.encode("a 🙂 b"), dtype=np.int32)
    assert tok.decode(ids) == "a 🙂 b"
    detok = tok.detokenizer(ids[:3])
    assert isinstance(detok, IncrementalDetokenizer)
    assert detok.push(ids[3:]) + detok.flush() == "🙂 b"
