"""Parity with transformers.Trainer: same tiny model, data, order and hyperparameters give the same
per-step losses and the same weights. This checks the loop, the schedule, clipping and the loss
normalisation under gradient accumulation against the reference implementation."""

import copy
import io

import pytest
import torch
from rich.console import Console
from transformers import Trainer, TrainingArguments

from conftest import RecordingTracker, rows_dataset
from lmforge.data.loader import collate, epoch_order
from lmforge.data.prepare import PreparedData, prepare_data
from lmforge.engine.loop import train
from lmforge.models.build import build_model
from lmforge.tracking.base import Trackers

STEPS, MBS, ACCUM = 6, 2, 2


def test_per_step_losses_match_trainer(tiny_config, tmp_path):
    config = tiny_config(
        f"train.max_steps={STEPS}",
        f"train.micro_batch_size={MBS}",
        f"train.grad_accum={ACCUM}",
        "train.lr=2e-3",
        "train.warmup_steps=2",
        "train.scheduler=cosine",
        "train.max_grad_norm=0.5",  # low enough to clip: clipping is compared too
        "train.weight_decay=0.0",  # Trainer decays embeddings, lmforge does not; with 0 both agree
        "train.adam_eps=1e-6",
    )
    prepared = prepare_data(config, log=lambda _: None)
    # ragged rows: micro-batches carry different numbers of target tokens
    rows = [r[: 8 + (7 * i) % 25] for i, r in enumerate(prepared.splits["train"]["input_ids"][:64])]
    data = PreparedData(
        prepared.tokenizer,
        {"train": rows_dataset(rows), "validation": prepared.splits["validation"]},
        prepared.report,
    )
    torch.manual_seed(1)
    model = build_model(config, prepared.tokenizer)

    # lmforge
    recorder = RecordingTracker()
    ours = train(
        copy.deepcopy(model), data, config, Trackers(recorder, [], None, print), console=Console(file=io.StringIO())
    )
    our_losses = [loss for _, loss in recorder.series("train/loss")]
    our_lrs = [lr for _, lr in recorder.series("train/lr")]

    # transformers.Trainer over the same rows in lmforge's epoch-0 order, read sequentially
    order = epoch_order(len(rows), config.seed, 0)
    ordered = data.splits["train"].select(order)
    pad_id = prepared.tokenizer.pad_token_id
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=STEPS,
        per_device_train_batch_size=MBS,
        gradient_accumulation_steps=ACCUM,
        learning_rate=config.train.lr,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        weight_decay=0.0,
        adam_beta1=config.train.adam_beta1,
        adam_beta2=config.train.adam_beta2,
        adam_epsilon=config.train.adam_eps,
        max_grad_norm=0.5,
        optim="adamw_torch_fused",  # what lmforge uses on CPU and CUDA
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        disable_tqdm=True,
        remove_unused_columns=False,  # the collator needs the rows' lengths
        seed=config.seed,
    )
    hf_model = copy.deepcopy(model)
    trainer = Trainer(
        model=hf_model,
        args=args,
        train_dataset=ordered,
        data_collator=lambda features: {k: v for k, v in collate(features, pad_id).items() if k != "num_tokens"},
    )
    trainer.train()
    hf_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    hf_losses = [entry["loss"] for entry in hf_logs]
    hf_lrs = [entry["learning_rate"] for entry in hf_logs]

    assert len(our_losses) == len(hf_losses) == STEPS
    assert our_losses == pytest.approx(hf_losses, rel=1e-5)
    assert our_lrs == pytest.approx(hf_lrs, rel=1e-6)
    assert our_losses[-1] < our_losses[0]  # it learned, so the comparison covers real updates
    for (name, ours_p), (_, theirs) in zip(ours.model.state_dict().items(), hf_model.state_dict().items(), strict=True):
        torch.testing.assert_close(ours_p, theirs, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
