"""Training and inference tokenize the same way: for every format, template and kind of tokenizer,
the ids a causal LM is prompted with (held-out samples, generation metrics, `lmforge generate`,
serving) are exactly the training row's tokens before its first trained one, with one BOS at most."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from conftest import chapters
from lmforge.config import DataConfig, GenerateConfig
from lmforge.data.sources import Record
from lmforge.data.tokenize import IGNORE_INDEX, Counts, adds_bos, prompt_and_reference, prompt_ids, record_examples
from lmforge.eval.generation import generate_each, prompts_and_references

OWN_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def make_tokenizer(kind: str, bos: bool, template: str | None) -> PreTrainedTokenizerFast:
    """A BPE trained here: GPT-2-style byte level or SentencePiece-style metaspace (Llama, Mistral);
    with `bos`, a post-processor that puts <s> in front as Llama's does."""
    model = Tokenizer(models.BPE(unk_token=None if kind == "bytelevel" else "<unk>"))
    if kind == "bytelevel":
        model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        model.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        model.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        model.decoder = decoders.Metaspace(prepend_scheme="first")
        alphabet = []
    specials = ["<s>", "</s>", "<unk>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    model.train_from_iterator([*chapters(30), "Paris 42 <human>: <assistant>: Q: A: x0"], trainer=trainer)
    if bos:
        model.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


TOKENIZERS = {
    f"{kind}{'-bos' if bos else ''}{'-own-template' if template else ''}{'-writes-bos' if writes else ''}": (
        kind,
        bos,
        ("{{ bos_token }}" if writes else "") + OWN_TEMPLATE if template else None,
    )
    for kind in ("bytelevel", "metaspace")
    for bos in (False, True)
    for template, writes in ((False, False), (True, False), (True, True))
}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def tokenizer(request):
    return make_tokenizer(*TOKENIZERS[request.param])


QA = [
    {"prompt": "What is the capital of France?", "completion": "Paris"},
    {"prompt": "Six times seven?", "completion": "42"},
    {"prompt": "Who led them?", "completion": " Moses, the son of Amram."},
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Six times seven?"},
        {"role": "assistant", "content": "42"},
        {"role": "user", "content": "And six times eight?"},
        {"role": "assistant", "content": "48"},
    ],
]
SETTINGS = [
    *(
        {"format": "prompt-completion", "template": t}
        for t in (None, "<human>: {prompt}\n<assistant>: ", "Q: {prompt}\nA:")
    ),
    {"format": "alpaca"},
    *({"format": "chat", "chat_template": t} for t in ("auto", "chatml", "llama-3", "gemma", "plain")),
]


def records(data: DataConfig) -> list[dict]:
    if data.format == "chat":
        return [{"messages": m} for m in CHATS]
    if data.format == "alpaca":
        return [{"instruction": r["prompt"], "output": r["completion"].strip()} for r in QA]
    return QA


def prefix_before_answer(ids, labels) -> list[int]:
    """The row's tokens before the last run of trained tokens (the answer a sample asks for)."""
    start = len(labels)
    while start > 1 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return list(ids[:start])


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_prompts_are_the_training_row_before_the_answer(tokenizer, setting):
    data = DataConfig(train="x", **setting)
    add_bos = adds_bos(tokenizer)
    cfg = GenerateConfig(num_examples=10)
    for fields in records(data):
        record = Record(fields, "f:1")
        (example,) = record_examples(record, data, tokenizer, add_bos, Counts())
        row = [int(t) for t in example.input_ids]
        assert row[:2].count(tokenizer.bos_token_id) <= 1, tokenizer.convert_ids_to_tokens(row[:4])
        expected = prefix_before_answer(row, example.labels)
        sample = prompt_and_reference(record, data, tokenizer)
        (prompt,) = prompts_and_references([sample], tokenizer, cfg)
        assert list(prompt.ids) == expected, (tokenizer.convert_ids_to_tokens(prompt.ids), expected)
        # answers like the run's held-out ones (the hints saved with a model) cut every kind right
        hinted, _ = prompt_ids(sample["prompt"], tokenizer, add_bos, [sample["reference"][:8]])
        assert hinted == expected, (tokenizer.convert_ids_to_tokens(hinted), tokenizer.convert_ids_to_tokens(expected))
        if not sample["reference"][0].isalpha():
            continue  # a free prompt assumes a word follows: not " Moses" after "A: " (two spaces), nor "42"
            # (whether " 4" is one token depends on the vocabulary; Llama's splits digits off the space)
        free, covered = prompt_ids(sample["prompt"], tokenizer, add_bos)  # the answer unknown, as when served
        assert free == expected, (tokenizer.convert_ids_to_tokens(free), tokenizer.convert_ids_to_tokens(expected))
        assert sample["prompt"][covered:] in ("", " ")  # only a trailing space is left for the model to write


def test_a_chat_row_starts_as_the_tokenizers_own_template_renders_it():
    tokenizer = make_tokenizer("metaspace", True, "{{ bos_token }}" + OWN_TEMPLATE)
    data = DataConfig(train="x", format="chat")
    (example,) = record_examples(Record({"messages": CHATS[0]}, "f:1"), data, tokenizer, True, Counts())
    rendered = tokenizer.apply_chat_template(CHATS[0], tokenize=True, return_dict=False)
    assert [int(t) for t in example.input_ids[: len(rendered)]] == list(rendered)
    assert [int(t) for t in example.input_ids].count(tokenizer.bos_token_id) == 1


def test_generate_prompts_the_model_with_those_ids_and_returns_what_follows_the_prompt():
    tokenizer = make_tokenizer("bytelevel", True, None)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    seen = []
    real = model.generate
    model.generate = lambda input_ids, **kw: seen.append(input_ids[0].tolist()) or real(input_ids=input_ids, **kw)
    prompt = "<human>: What is the capital of France?\n<assistant>: "
    cfg = GenerateConfig(max_new_tokens=3, temperature=0.0)
    (text,) = [g.text for g in generate_each(model, tokenizer, [prompt], cfg)]
    ids, covered = prompt_ids(prompt, tokenizer, True)
    assert seen == [ids] and ids[0] == tokenizer.bos_token_id and covered == len(prompt) - 1
    whole = tokenizer.decode(real(input_ids=torch.tensor([ids]), max_new_tokens=3, do_sample=False)[0, len(ids) :])
    # the model's first token carries the template's space; it is not printed twice
    assert text == (whole[1:] if whole.startswith(" ") else whole)
