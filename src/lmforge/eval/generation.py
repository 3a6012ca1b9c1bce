"""Sampling text from a model, without disturbing the training random state."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lmforge.config import GenerateConfig


def prompts_and_references(
    samples: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, cfg: GenerateConfig
) -> list[tuple[str, str | None]]:
    """Prompts to sample from: the configured ones, else held-out records: their prompt and true
    completion, or for plain text the opening tokens of the document and its continuation."""
    if cfg.prompts:
        return [(p, None) for p in cfg.prompts[: cfg.num_examples]]
    pairs = []
    for sample in samples[: cfg.num_examples]:
        if "prompt" in sample:
            pairs.append((sample["prompt"], sample["reference"]))
            continue
        ids = tokenizer(sample["text"], add_special_tokens=False)["input_ids"]
        prompt_ids = ids[: cfg.prompt_tokens]
        reference_ids = ids[cfg.prompt_tokens : cfg.prompt_tokens + cfg.max_new_tokens]
        pairs.append((tokenizer.decode(prompt_ids), tokenizer.decode(reference_ids)))
    return pairs


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    cfg: GenerateConfig,
    seed: int = 0,
) -> list[str]:
    """Continue each prompt; return only the new text.

    Runs under a forked RNG seeded by `seed`, so sampling gives the same text every time and leaves
    the random streams of training untouched.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for prompt in prompts:
            encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=model.config.is_encoder_decoder)
            input_ids = encoded["input_ids"].to(device)
            if input_ids.shape[1] == 0:  # an empty prompt starts from a document boundary
                input_ids = torch.tensor([[tokenizer.eos_token_id]], device=device)
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=cfg.max_new_tokens,
                do_sample=cfg.temperature > 0,
                temperature=cfg.temperature if cfg.temperature > 0 else None,
                top_k=cfg.top_k if cfg.temperature > 0 else None,
                top_p=None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new = out[0] if model.config.is_encoder_decoder else out[0, input_ids.shape[1] :]
            outputs.append(tokenizer.decode(new, skip_special_tokens=True))
    model.train(was_training)
    return outputs


@torch.no_grad()
def predict_labels(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[str]:
    """The class a classifier gives each text, by name."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    names = []
    limit = min(getattr(model.config, "max_position_embeddings", None) or 1 << 30, tokenizer.model_max_length)
    for text in texts:
        encoded = tokenizer(text, return_tensors="pt", truncation=True, max_length=limit).to(device)
        names.append(model.config.id2label[int(model(**encoded).logits.argmax(-1))])
    model.train(was_training)
    return names


def respond(model, tokenizer, prompts: list[str], cfg: GenerateConfig, seed: int) -> list[str]:
    """What the model makes of each prompt: a continuation, a target sequence, or a class name."""
    if getattr(model.config, "id2label", None) and type(model).__name__.endswith("ForSequenceClassification"):
        return predict_labels(model, tokenizer, prompts)
    return generate(model, tokenizer, prompts, cfg, seed=seed)
