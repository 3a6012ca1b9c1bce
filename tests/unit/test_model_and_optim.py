import math

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from lmforge.config import load_config
from lmforge.engine.optim import lr_factor, param_groups
from lmforge.models.build import build_model, count_parameters, llama_config
from lmforge.models.presets import PRESETS
from lmforge.models.tokenizer import train_bpe_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    from conftest import chapters

    return train_bpe_tokenizer(chapters(20), vocab_size=400)


def config_for(preset, **extra):
    overrides = [f"model.preset={preset}", "tokenizer.train=true", "data.train=x.txt"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides, env={})


def test_tokenizer_round_trips_any_text(tokenizer):
    text = "In the beginning — naïve café 東京 \t tabs\nand newlines 🙂"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    assert len(tokenizer) == 400


@pytest.mark.parametrize(
    ("preset", "vocab", "low", "high"),
    [("llama-tiny", 4096, 0.4e6, 0.8e6), ("llama-20m", 8192, 18e6, 23e6), ("llama-120m", 32000, 110e6, 130e6)],
)
def test_preset_sizes(preset, vocab, low, high):
    from transformers import LlamaForCausalLM

    class Vocab:  # just what llama_config reads from a tokenizer
        bos_token_id = eos_token_id = 0
        pad_token_id = 1

        def __len__(self):
            return vocab

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(config_for(preset), Vocab()))
    total = count_parameters(model)[1]
    assert low < total < high, f"{preset}: {total / 1e6:.1f}M"


def test_explicit_sizes_override_preset(tokenizer):
    model = build_model(config_for("llama-tiny", **{"model.hidden_size": 96, "model.num_layers": 3}), tokenizer)
    assert model.config.hidden_size == 96 and model.config.num_hidden_layers == 3
    assert model.config.intermediate_size == PRESETS["llama-tiny"]()["intermediate_size"]
    assert model.config.vocab_size == 400 and model.config.eos_token_id == tokenizer.eos_token_id


def test_seeded_build_is_reproducible(tokenizer):
    config = config_for("llama-tiny")
    torch.manual_seed(5)
    a = build_model(config, tokenizer).state_dict()
    torch.manual_seed(5)
    b = build_model(config, tokenizer).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_weight_decay_on_norms_biases_embeddings(tokenizer):
    model = build_model(config_for("llama-tiny"), tokenizer)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert "model.embed_tokens.weight" in undecayed
    assert all("norm" in n or n == "model.embed_tokens.weight" for n in undecayed)
    assert all(n.endswith("proj.weight") or n == "lm_head.weight" for n in decayed)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decayed) + len(undecayed) == len(list(model.parameters()))


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedule_matches_transformers(kind):
    total, warmup = 50, 7
    param = torch.nn.Parameter(torch.zeros(1))
    reference = torch.optim.SGD([param], lr=1.0)
    make = get_cosine_schedule_with_warmup if kind == "cosine" else get_linear_schedule_with_warmup
    scheduler = make(reference, warmup, total)
    for step in range(total + 1):
        assert lr_factor(step, total, warmup, kind) == pytest.approx(scheduler.get_last_lr()[0], abs=1e-12), step
        reference.step()
        scheduler.step()


def test_schedule_floor_and_constant():
    assert lr_factor(100, 100, 10, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(55, 100, 10, "cosine", min_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(5, 100, 10, "constant") == 0.5
    assert lr_factor(99, 100, 10, "constant") == 1.0
    assert math.isclose(lr_factor(0, 100, 0, "linear"), 1.0)


@pytest.mark.parametrize("preset", ["llama-tiny", "llama-20m", "llama-120m", "t5-tiny"])
def test_a_fresh_model_of_every_preset_starts_near_the_uniform_loss(preset):
    """A new model knows nothing: its loss on random tokens is about ln(vocab), not 60 (perplexity
    1e26), or training spends its first steps undoing the initialisation."""
    import math

    from lmforge.config import load_config
    from lmforge.models.build import build_model
    from lmforge.models.presets import PRESET_TASKS
    from lmforge.models.tokenizer import train_bpe_tokenizer

    task = PRESET_TASKS.get(preset, "causal-lm")
    tokenizer = train_bpe_tokenizer(["In the beginning God created the heaven and the earth."] * 20, vocab_size=400)
    fmt = "seq2seq" if task == "seq2seq" else "text"
    overrides = [f"model.preset={preset}", f"model.task={task}", "tokenizer.train=true", f"data.format={fmt}"]
    config = load_config(None, [*overrides, "data.train=x"], env={})
    torch.manual_seed(0)
    model = build_model(config, tokenizer)
    ids = torch.randint(0, len(tokenizer), (4, 32))
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    uniform = math.log(len(tokenizer))  # logits of std s add about s^2 / 2 to it
    assert uniform - 0.5 < loss < uniform + 1.5, (preset, loss, uniform)
