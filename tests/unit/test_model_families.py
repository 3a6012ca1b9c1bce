"""model.architecture / model.config / model.dropout: config-time errors that name the setting and the
fix, lmforge's sizes under each family's own names, dropout on every dropout field, and the checks
of a new model (causal, packed examples kept apart, a loss the chunked loss can take) that pick or
refuse its attention."""

import pytest
import torch
from transformers import LlamaForCausalLM

from lmforge.config import load_config
from lmforge.data.loader import IGNORE_INDEX, collate
from lmforge.engine.losses import causal_lm_step
from lmforge.errors import ConfigError, UserError
from lmforge.models.build import build_model, check_new_model, count_parameters, dropout_fields, family_config
from lmforge.models.tokenizer import train_bpe_tokenizer

BASE = ["tokenizer.train=true", "data.train=x.txt"]
TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.intermediate_size=128"]


@pytest.fixture(scope="module")
def tokenizer():
    from conftest import chapters

    return train_bpe_tokenizer(chapters(20), vocab_size=400)


def config_of(*overrides):
    return load_config(None, [*BASE, *overrides], env={})


def problems_of(*overrides) -> str:
    with pytest.raises(ConfigError) as info:
        config_of(*overrides)
    return "\n".join(info.value.problems)


def built(tokenizer, *overrides):
    torch.manual_seed(0)
    return build_model(config_of(*overrides), tokenizer)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.architecture=gtp2", *TINY], "model.architecture: unknown model type 'gtp2'; did you mean gpt2?"),
        (["model.architecture=GPT2LMHeadModel", *TINY], "did you mean gpt2?"),  # a class name: its model_type
        (["model.architecture=nosuchthing", *TINY], "causal LMs include llama, gpt2, qwen2"),
        (
            ["model.architecture=gpt2", *TINY, "model.config={n_embed: 32}"],
            "model.config.n_embed: GPT2Config has no such field; did you mean n_embd?",
        ),
        (
            ["model.architecture=qwen2", *TINY, "model.config={rope_thetta: 1e6}"],
            "model.config.rope_thetta: Qwen2Config has no such field; did you mean rope_theta?",
        ),
        (
            ["model.architecture=gpt2", "model.name_or_path=some/model", "tokenizer.train=false"],
            "model.architecture builds a new model, and model.name_or_path loads a pretrained one",
        ),
        (
            ["model.config={rope_theta: 1e6}", "model.name_or_path=some/model", "tokenizer.train=false"],
            "remove model.config or model.name_or_path",
        ),
        (
            ["model.architecture=ernie4_5", *TINY, "model.dropout=0.1"],
            "model.dropout: ernie4_5 models have no dropout (Ernie4_5Config has no field whose name holds dropout",
        ),
        (
            ["model.architecture=t5", *TINY],
            "model.architecture=t5: transformers has no causal LM of this family (no AutoModelForCausalLM class; it "
            "is an encoder-decoder), and model.task=causal-lm needs one",
        ),
        (["model.architecture=vit", *TINY], "model.architecture=vit: transformers has no causal LM of this family"),
        (
            ["model.architecture=gpt2", "model.preset=t5-tiny", "model.task=seq2seq", "data.format=seq2seq"],
            "model.architecture builds causal LMs from scratch, not model.task=seq2seq",
        ),
        (["model.architecture=mamba", *TINY], "MambaForCausalLM takes no position ids"),
        (["model.architecture=gemma3", *TINY], "build its text model instead: model.architecture=gemma3_text"),
        (
            ["model.architecture=qwen2"],
            "model: a new qwen2 model needs its sizes (Qwen2Config's defaults are a full-size model): give "
            "model.preset, or model.hidden_size, model.num_layers, model.num_heads, model.intermediate_size",
        ),
        (
            ["model.architecture=gpt2", *TINY, "model.num_kv_heads=2"],
            "model.num_kv_heads: gpt2 models have no such size (GPT2Config has no num_key_value_heads); this "
            "family has no grouped-query attention",
        ),
        (
            ["model.architecture=gpt2", *TINY, "model.config={model_type: llama}"],
            "lmforge sets it from model.architecture",
        ),
        (["model.architecture=gpt2", *TINY, "model.config={n_embd: wide}"], "GPT2Config refuses these settings"),
        (
            ["model.architecture=gpt2", *TINY, "model.config={n_positions: 128}"],
            "data.max_length (512) exceeds the model's 128 positions (model.config.n_positions): lower "
            "data.max_length or raise model.config.n_positions",
        ),
        (["model.architecture=qwen2", *TINY, "model.num_heads=3"], "must be divisible by model.num_heads (3)"),
        (
            ["model.architecture=gpt2", "model.config={n_embd: 64, n_layer: 2, n_head: 4, hidden_size: 32}"],
            "model.config gives n_embd twice",
        ),
    ],
)
def test_architecture_errors_name_the_setting_and_the_fix(overrides, expected):
    assert expected in problems_of(*overrides)


def test_every_problem_is_reported_at_once():
    text = problems_of("model.architecture=gpt2", *TINY, "model.num_kv_heads=2", "model.config={n_embed: 1, attn: 2}")
    assert "model.num_kv_heads" in text and "model.config.n_embed" in text and "model.config.attn" in text


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.architecture=gpt2", "model.config={n_embd: 64, n_layer: 2, n_head: 4}"],  # n_inner: 4 x n_embd
        [
            "model.architecture=llama",
            "model.config={hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, intermediate_size: 128}",
        ],  # fmt: skip
        ["model.preset=qwen2-tiny", "model.config={rope_theta: 1e6, use_sliding_window: false}"],
        ["model.preset=gpt2-tiny", "model.dropout=0.0"],
        ["model.preset=llama-tiny", "model.dropout=0.1"],
    ],
)
def test_valid_architectures(overrides):
    config_of(*overrides)


def test_lmforge_sizes_under_gpt2s_names_and_the_tokenizers_vocabulary(tokenizer):
    config = config_of("model.architecture=gpt2", *TINY, "data.max_length=2048", "model.config={n_layer: 3}")
    gpt2 = family_config(config, tokenizer)
    assert (gpt2.n_embd, gpt2.n_head, gpt2.n_inner) == (64, 4, 128)
    assert gpt2.n_layer == 3  # model.config wins over model.num_layers
    assert gpt2.n_positions == 2048  # the family's 1024, raised to data.max_length
    assert gpt2.tie_word_embeddings  # not given: the family's default
    assert gpt2.vocab_size == len(tokenizer)
    assert (gpt2.bos_token_id, gpt2.eos_token_id, gpt2.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert dropout_fields(gpt2) == ["attn_pdrop", "embd_pdrop", "resid_pdrop", "summary_first_dropout"]


def test_sizes_a_family_fixes_follow_lmforges(tokenizer):
    qwen2 = family_config(config_of("model.architecture=qwen2", *TINY), tokenizer)
    assert qwen2.num_key_value_heads == 4  # num_heads (lmforge's default), not Qwen2Config's 32
    assert qwen2.sliding_window is None and set(qwen2.layer_types) == {"full_attention"}
    qwen3 = family_config(config_of("model.architecture=qwen3", *TINY, "model.num_kv_heads=2"), tokenizer)
    assert (qwen3.head_dim, qwen3.num_key_value_heads) == (16, 2)  # hidden / heads, not Qwen3Config's 128
    with pytest.raises(UserError, match="model.config.vocab_size=100 is below the tokenizer's 400 tokens"):
        family_config(config_of("model.architecture=qwen2", *TINY, "model.config={vocab_size: 100}"), tokenizer)


def test_presets_of_other_families(tokenizer):
    gpt2, qwen2 = built(tokenizer, "model.preset=gpt2-tiny"), built(tokenizer, "model.preset=qwen2-tiny")
    assert type(gpt2).__name__ == "GPT2LMHeadModel" and type(qwen2).__name__ == "Qwen2ForCausalLM"
    assert qwen2.config.num_key_value_heads == 2
    assert 150e3 < count_parameters(gpt2)[1] < 250e3 and 150e3 < count_parameters(qwen2)[1] < 250e3
    # a preset gives only the sizes when model.architecture names another family
    mistral = built(tokenizer, "model.preset=qwen2-tiny", "model.architecture=mistral")
    assert type(mistral).__name__ == "MistralForCausalLM" and mistral.config.num_key_value_heads == 2


def test_a_llama_through_model_config_has_the_presets_weights(tokenizer):
    """llama-tiny is built as it always was; the same Llama through model.config (the family path)
    draws the same weights from the same seed."""
    preset = built(tokenizer, "model.preset=llama-tiny")
    configured = built(tokenizer, "model.preset=llama-tiny", "model.config={rms_norm_eps: 1.0e-6}")
    assert type(preset) is LlamaForCausalLM and type(configured) is LlamaForCausalLM
    a, b = preset.state_dict(), configured.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_model_dropout_reaches_every_dropout_module(tokenizer, tmp_path):
    gpt2 = built(tokenizer, "model.preset=gpt2-tiny", "model.dropout=0.25")
    rates = {m.p for m in gpt2.modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == {0.25}
    assert all(getattr(gpt2.config, name) == 0.25 for name in dropout_fields(gpt2.config))
    qwen2 = built(tokenizer, "model.preset=qwen2-tiny", "model.dropout=0.25")
    assert qwen2.config.attention_dropout == 0.25 and qwen2.model.layers[0].self_attn.attention_dropout == 0.25
    llama = built(tokenizer, "model.preset=llama-tiny", "model.dropout=0.25")
    assert llama.model.layers[0].self_attn.attention_dropout == 0.25
    t5 = built(tokenizer, "model.preset=t5-tiny", "model.task=seq2seq", "data.format=seq2seq", "model.dropout=0.25")
    assert t5.config.dropout_rate == 0.25 and {m.p for m in t5.modules() if isinstance(m, torch.nn.Dropout)} == {0.25}
    # a pretrained model: given to from_pretrained, the dropout is in the config its modules are built from
    from conftest import save_tiny_llama

    path = save_tiny_llama(tmp_path / "llama", tokenizer)
    config = load_config(None, [f"model.name_or_path={path}", "data.train=x.txt", "model.dropout=0.25"], env={})
    pretrained = build_model(config, tokenizer)
    assert pretrained.model.layers[0].self_attn.attention_dropout == 0.25


def test_attention_follows_what_the_family_does(tokenizer):
    # Mistral slides its attention window by default: not varlen; without the window, varlen
    assert built(tokenizer, "model.architecture=mistral", *TINY).config._attn_implementation == "sdpa"
    windowless = built(tokenizer, "model.architecture=mistral", *TINY, "model.config={sliding_window: null}")
    assert windowless.config._attn_implementation == "lmforge_varlen"
    # OPT's sdpa path ignores position ids: packed examples would see each other
    assert built(tokenizer, "model.architecture=opt", *TINY).config._attn_implementation == "lmforge_varlen"
    with pytest.raises(UserError, match="data.packing: with sdpa attention, opt models let the examples packed"):
        built(tokenizer, "model.architecture=opt", *TINY, "model.attention=sdpa")
    unpacked = built(tokenizer, "model.architecture=opt", *TINY, "model.attention=sdpa", "data.packing=false")
    assert unpacked.config._attn_implementation == "sdpa"


def test_a_new_model_that_is_not_causal_or_does_not_run_is_refused_at_config_time(tokenizer):
    # training's check of a new model runs on one block when the config is read: `config validate` says it
    bert = built(tokenizer, "model.architecture=bert", *TINY)
    assert bert.config.is_decoder  # BERT's LM head model decodes only when told
    text = problems_of("model.architecture=bert", *TINY, "model.config={is_decoder: false}")
    assert "model.architecture=bert: the new model is not causal" in text
    text = problems_of("model.architecture=gptj", *TINY, "model.config={rotary_dim: 15}")
    assert "a forward pass of the new model fails" in text
    encoder_config = bert.config.__class__(**{**bert.config.to_dict(), "is_decoder": False})
    with pytest.raises(UserError, match="model.architecture=bert: the new model is not causal"):
        check_new_model(type(bert)(encoder_config), config_of("model.architecture=bert", *TINY))  # training's


def test_the_config_check_leaves_the_random_state_as_it_was():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    config_of("model.preset=gpt2-tiny")  # builds and checks one block of a new GPT-2
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


def test_a_rotary_family_rotates_at_most_a_whole_head(tokenizer):
    # GPT-J's rotary_dim defaults to 64, a full-size model's head: a head of 16 rotates 16
    model = built(tokenizer, "model.architecture=gptj", *TINY)
    assert model.config.rotary_dim == 16
    assert built(tokenizer, "model.architecture=gptj", *TINY, "model.config={rotary_dim: 8}").config.rotary_dim == 8
    text = problems_of("model.architecture=gptj", *TINY, "model.config={rotary_dim: 32}")
    assert "model.config.rotary_dim (32) exceeds the head size (64 / 4 = 16): lower it to at most 16" in text


def test_size_errors_name_the_fields_the_user_set():
    text = problems_of("model.architecture=gpt2", "model.config={n_embd: 30, n_layer: 2, n_head: 4}")
    assert "model.config.n_embd (30) must be divisible by model.config.n_head (4)" in text
    assert "model.hidden_size (30) must be divisible by model.num_heads (4)" in problems_of(
        "model.architecture=gpt2", "model.hidden_size=30", "model.num_layers=2", "model.num_heads=4"
    )


def test_a_key_without_a_space_after_its_colon_is_named_with_the_fix():
    text = problems_of("model.architecture=gpt2", *TINY, "model.config={n_embd:32}")
    assert "YAML reads 'n_embd:32' as one key with no value (a colon needs a space after it): write n_embd: 32" in text
    assert "needs its sizes" not in text and "no such field" not in text  # one problem, said once


@pytest.mark.parametrize(
    "family",
    [["model.preset=gpt2-tiny"], ["model.preset=qwen2-tiny"], ["model.architecture=bert", *TINY]],
    ids=["gpt2", "qwen2", "bert"],  # BERT keeps its output layer's bias apart: the layer swaps out all the same
)
def test_the_chunked_loss_equals_the_plain_loss(tokenizer, family):
    model = built(tokenizer, *family, "model.dropout=0")
    ids = [(torch.arange(n) * 11 + 5).remainder(len(tokenizer)).tolist() for n in (13, 7, 21)]
    rows = [{"input_ids": t, "labels": [IGNORE_INDEX, *t[1:]], "lengths": [len(t)], "num_tokens": len(t)} for t in ids]
    batch = collate(rows, tokenizer.pad_token_id)
    results = []
    for chunk in (None, 8):
        model.zero_grad()
        loss, count = causal_lm_step(model, batch, chunk)
        loss.backward()
        results.append((loss.detach(), int(count), [p.grad.clone() for p in model.parameters()]))
    (plain, plain_count, plain_grads), (chunked, chunked_count, chunked_grads) = results
    assert plain_count == chunked_count == sum(len(t) - 1 for t in ids)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(chunked_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_plan_says_when_a_preset_of_one_family_sizes_another():
    from lmforge.run import _preset_said

    assert _preset_said(config_of("model.preset=gpt2-tiny", "model.architecture=qwen2")) == (
        ", the sizes of the gpt2 preset gpt2-tiny"
    )
    assert _preset_said(config_of("model.preset=llama-tiny", "model.architecture=gpt2")) == (
        ", the sizes of the llama preset llama-tiny"
    )
    assert _preset_said(config_of("model.preset=gpt2-tiny", "model.architecture=gpt2")) == ""
    assert _preset_said(config_of("model.preset=gpt2-tiny")) == ""


def test_a_pretrained_model_whose_attention_ignores_position_ids_is_not_packed(tokenizer, tmp_path):
    """A loaded model goes through the same packed-row check when its attention is not lmforge's varlen:
    OPT's sdpa path ignores the position ids (its packed examples would see each other); Llama's finds
    the packed examples from them."""
    from conftest import save_tiny_llama

    opt = built(tokenizer, "model.architecture=opt", *TINY)
    opt.save_pretrained(tmp_path / "opt")
    tokenizer.save_pretrained(tmp_path / "opt")
    pretrained = ["model.name_or_path=" + str(tmp_path / "opt"), "tokenizer.train=false"]
    with pytest.raises(UserError, match="data.packing: with sdpa attention, opt models let the examples packed"):
        built(tokenizer, *pretrained, "model.attention=sdpa")
    assert built(tokenizer, *pretrained).config._attn_implementation == "lmforge_varlen"
    assert built(tokenizer, *pretrained, "model.attention=sdpa", "data.packing=false").config._attn_implementation == (
        "sdpa"
    )
    llama = ["model.name_or_path=" + str(save_tiny_llama(tmp_path / "llama", tokenizer)), "tokenizer.train=false"]
    assert built(tokenizer, *llama, "model.attention=sdpa").config._attn_implementation == "sdpa"
