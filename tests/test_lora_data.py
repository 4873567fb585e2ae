"""Fine-tuning data: format detection, masking of every assistant turn, truncation, packing."""

from __future__ import annotations

import numpy as np
import pytest
from lora_helpers import write_jsonl

from mlx_openelm.errors import DataError
from mlx_openelm.lora.batching import epoch_order, make_batch, pack_rows, plan_rows
from mlx_openelm.lora.data import Example, encode_file, load_datasets
from mlx_openelm.tokenizer import ZEPHYR_CHAT_TEMPLATE, Tokenizer


@pytest.fixture(scope="module")
def chat_tok(tiny_spm):
    return Tokenizer(tiny_spm, chat_template=ZEPHYR_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def base_tok(tiny_spm):
    return Tokenizer(tiny_spm)


def trained_spans(tok: Tokenizer, ex: Example) -> list[str]:
    """The texts of the maximal runs of trained tokens."""
    spans, i, ids = [], 0, ex.tokens.tolist()
    while i < len(ids):
        j = i
        while j < len(ids) and ex.trained[j]:
            j += 1
        if j > i:
            spans.append(tok.decode(ids[i:j], skip_special=False))
        i = j + 1
    return spans


def test_text_format_trains_everything_and_ends_with_eos(tmp_path, base_tok):
    data = encode_file(write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}]), base_tok, 64)
    (ex,) = data.examples
    assert data.format == "text"
    assert ex.tokens.tolist() == base_tok.encode("hello world") + [base_tok.eos_id]
    assert ex.trained.all()


def test_mask_prompt_trains_every_assistant_turn(tmp_path, chat_tok):
    messages = [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "the model"},
        {"role": "user", "content": "and you"},
        {"role": "assistant", "content": "apple open"},
    ]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])
    (ex,) = encode_file(path, chat_tok, 256, mask_prompt=True).examples
    # Both replies (not only the last, as in mlx-lm) with their end-of-turn, nothing else.
    assert trained_spans(chat_tok, ex) == ["the model</s>\n", "apple open</s>\n"]
    full = chat_tok.encode(chat_tok.apply_chat_template(messages, add_generation_prompt=False))
    assert ex.tokens.tolist() == full  # same ids as the model sees at inference
    (unmasked,) = encode_file(path, chat_tok, 256).examples
    assert unmasked.trained.all()


def test_completions_use_the_chat_template_or_plain_concatenation(tmp_path, chat_tok, base_tok):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "hello", "completion": " world"}])
    (chat,) = encode_file(path, chat_tok, 128, mask_prompt=True).examples
    assert trained_spans(chat_tok, chat) == ["world</s>\n"]  # decode drops the leading space
    (plain,) = encode_file(path, base_tok, 128, mask_prompt=True).examples
    assert plain.tokens.tolist() == base_tok.encode("hello world") + [base_tok.eos_id]
    assert base_tok.decode(plain.tokens[plain.trained].tolist()) == "world"


def test_truncation_and_dropping_are_counted(tmp_path, chat_tok):
    long_prompt = {"prompt": "hello " * 40, "completion": "world"}
    path = write_jsonl(tmp_path / "pc.jsonl", [long_prompt, {"prompt": "a", "completion": "b"}])
    data = encode_file(path, chat_tok, 40, mask_prompt=True)
    # The long prompt fills all 40 tokens: truncated, and nothing is left to train on.
    assert (data.truncated, data.dropped, len(data)) == (1, 1, 1)
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello " * 40}])
    data = encode_file(text, chat_tok, 16)
    assert data.truncated == 1 and len(data.examples[0].tokens) == 16


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"text": "a"}', '{"text": "b"'], "bad.jsonl:2: malformed JSON"),
        (['{"text": "a", "label": 1}'], "bad.jsonl:1: unknown key(s) label"),
        (['{"text": "a"}', '{"prompt": "a", "completion": "b"}'], "bad.jsonl:2: unknown key(s)"),
        (['{"prompt": "a"}'], "bad.jsonl:1: missing key(s) completion"),
        (['{"foo": "a"}'], "bad.jsonl:1: no 'text', 'prompt'/'completion' or 'messages' key"),
        (['{"messages": [{"role": "user", "content": "hi"}]}'], "bad.jsonl:1: no assistant turn"),
        (['{"messages": [{"role": "bot", "content": "hi"}]}'], "message 0 has role 'bot'"),
        (["", "  "], "is empty"),
        (["[1, 2]"], "bad.jsonl:1: expected a JSON object"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, chat_tok, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        encode_file(path, chat_tok, 64, mask_prompt=True)
    assert message in str(e.value)


def test_chat_data_needs_a_chat_template(tmp_path, base_tok):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(DataError, match="no chat template"):
        encode_file(path, base_tok, 64)


def test_resolve_files_errors(tmp_path, base_tok):
    with pytest.raises(DataError, match="either --data DIR"):
        load_datasets(base_tok)
    with pytest.raises(DataError, match="does not exist"):
        load_datasets(base_tok, data_dir=tmp_path)  # no train.jsonl
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a b"}])
    with pytest.raises(DataError, match="--test needs a test.jsonl"):
        load_datasets(base_tok, data_dir=tmp_path, test=True)
    sets = load_datasets(base_tok, data_dir=tmp_path)
    assert len(sets.train) == 1 and sets.valid is None and sets.test is None


def test_best_fit_packing_places_every_example_once_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=500).tolist()
    rows = pack_rows(lengths, 128)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    lower_bound = -(-sum(lengths) // 128)
    assert len(rows) <= lower_bound * 1.03 + 1  # near-optimal fill
    assert pack_rows(lengths, 128) == rows  # deterministic


def test_make_batch_lays_out_segments_targets_and_weights():
    ex = [
        Example(np.array([1, 5, 6, 2], np.int32), np.array([1, 0, 1, 1], bool)),
        Example(np.array([1, 7, 2], np.int32), np.ones(3, bool)),
    ]
    batch = make_batch(ex, [[0, 1]], capacity=64, packed=True)
    assert batch.inputs.shape == (1, 32)  # padded to a multiple of 32
    assert batch.inputs[0, :5].tolist() == [1, 5, 6, 1, 7]
    assert batch.targets[0, :5].tolist() == [5, 6, 2, 7, 2]
    assert batch.weights[0, :5].tolist() == [0, 1, 1, 1, 1]
    assert batch.segments[0, :6].tolist() == [1, 1, 1, 2, 2, 0]
    assert batch.weights[0, 5:].sum() == 0 and batch.num_tokens == 5
    assert plan_rows(ex, 64, pack=False) == [[0], [1]]
    assert make_batch(ex, [[0], [1]], 64, packed=False).segments is None


def test_epoch_order_is_a_seeded_permutation():
    a, b = epoch_order(10, seed=3, epoch=0), epoch_order(10, seed=3, epoch=1)
    assert sorted(a) == list(range(10)) and not np.array_equal(a, b)
    assert np.array_equal(a, epoch_order(10, seed=3, epoch=0))


def test_epoch_order_groups_rows_of_similar_length_into_batches():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 200, 101)  # 101 rows: batches of 4 leave one row over
    order = epoch_order(101, seed=1, epoch=0, lengths=lengths, batch_size=4)
    assert sorted(order.tolist()) == list(range(101))
    assert np.array_equal(order, epoch_order(101, 1, 0, lengths, 4))  # rebuildable on resume
    assert not np.array_equal(order, epoch_order(101, 1, 1, lengths, 4))  # reshuffled per epoch

    def padded(order: np.ndarray) -> int:  # positions computed when a batch pads to its longest
        return sum(4 * lengths[order[i : i + 4]].max() for i in range(0, 100, 4))

    plain = epoch_order(101, seed=1, epoch=0)
    assert padded(order) < 0.8 * padded(plain)
    # every batch comes from one window of rows sorted by length: batch spread is small
    spread = [np.ptp(lengths[order[i : i + 4]]) for i in range(0, 100, 4)]
    assert np.median(spread) < 0.25 * np.ptp(lengths)


def test_line_numbers_survive_unicode_line_separators_and_bad_utf8(tmp_path, base_tok):
    path = tmp_path / "u.jsonl"
    path.write_bytes('{"text": "a\u2028b"}\n{"text": "c"}\n'.encode() + b'{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"u\.jsonl:3: not valid UTF-8"):
        encode_file(path, base_tok, 64)
