"""How the processes of a job share the model: DDP, FSDP2, DeepSpeed (distributed.strategy).

FSDP2 is PyTorch's `torch.distributed.fsdp.fully_shard`, applied the way accelerate and torchtitan
apply it: each transformer block (the classes a Hugging Face model lists in `_no_split_modules`) is
one unit whose weights are gathered for its forward and backward, and the root holds the rest
(embeddings, final norm, head). lmforge applies it itself because accelerate 1.x turns FSDP on only
for GPU-class jobs (`AcceleratorState`: MULTI_GPU/NPU/XPU...), and a CPU job over gloo is how it is
tested here; everything else (autocast, the optimizer wrapper, reductions) stays accelerate's.

Checkpoints of a sharded model go through `torch.distributed.checkpoint` (engine.checkpoint), which
reshards on load: a job of 2 processes resumes on 1 or 4.
"""

from __future__ import annotations

import copy
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from lmforge.config import Config, DeepSpeedConfig, FsdpConfig, TrainConfig
from lmforge.errors import UserError

ACCELERATE_STRATEGIES = {"ACCELERATE_USE_FSDP": "fsdp", "ACCELERATE_USE_DEEPSPEED": "deepspeed"}
"""What `accelerate launch --config_file` sets for its FSDP and DeepSpeed configs."""


def resolve_strategy(config: Config, world: int) -> str:
    """distributed.strategy for a job of `world` processes: "single", "ddp", "fsdp" or "deepspeed".

    auto is what `accelerate launch` was configured with (ACCELERATE_USE_FSDP/DEEPSPEED in the
    environment), else ddp. One process of ddp is "single"; one of fsdp trains unsharded but keeps
    the sharded checkpoint format (engine.checkpoint), so that a resume on more processes reads it;
    one of deepspeed is DeepSpeed's (its offload is for one GPU too)."""
    strategy = config.distributed.strategy
    if strategy == "auto":
        chosen = [s for var, s in ACCELERATE_STRATEGIES.items() if os.environ.get(var, "").lower() == "true"]
        strategy = chosen[0] if chosen else "ddp"
    if world == 1 and strategy == "ddp":
        return "single"
    return strategy


def fsdp_settings(config: Config) -> FsdpConfig:
    """The FSDP settings a job trains with: distributed.fsdp, except under strategy auto in a job
    that `accelerate launch --config_file` started with an FSDP config, whose own settings apply
    (FSDP_RESHARD_AFTER_FORWARD, FSDP_OFFLOAD_PARAMS and FSDP_ACTIVATION_CHECKPOINTING in the
    environment, as accelerate.utils.launch sets them; FSDP1's FULL_SHARD reshards, its other
    strategies keep the weights gathered)."""
    settings = config.distributed.fsdp
    if config.distributed.strategy != "auto" or os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true":
        return settings
    said = {
        "reshard_after_forward": os.environ.get("FSDP_RESHARD_AFTER_FORWARD"),
        "cpu_offload": os.environ.get("FSDP_OFFLOAD_PARAMS"),
        "activation_checkpointing": os.environ.get("FSDP_ACTIVATION_CHECKPOINTING"),
    }
    flag = lambda value: value.lower() in ("true", "full_shard", "1")  # noqa: E731
    return settings.model_copy(update={key: flag(value) for key, value in said.items() if value is not None})


def check_strategy(strategy: str) -> None:
    """Refuse a strategy this machine cannot run, before any process group is set up.

    Raises:
        UserError: deepspeed without the deepspeed package.
    """
    import importlib.util

    if strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise UserError("distributed.strategy=deepspeed needs the deepspeed package: pip install 'lmforge[deepspeed]'")


def check_deepspeed_batch(config: Config, processes: int) -> None:
    """A DeepSpeed JSON file's explicit train_batch_size against the job: DeepSpeed requires
    micro-batch x accumulation x processes, and would say so only once every process is up.

    Raises:
        UserError: naming the value to write.
    """
    settings, train = config.distributed.deepspeed, config.train
    if settings.config_file is None or resolve_strategy(config, processes) != "deepspeed":
        return
    batch = json.loads(Path(settings.config_file).read_text(encoding="utf-8")).get("train_batch_size", "auto")
    wanted = train.micro_batch_size * train.grad_accum * processes
    if batch not in ("auto", wanted):
        raise UserError(
            f"distributed.deepspeed.config_file: {settings.config_file}: train_batch_size is {batch}, but a job of "
            f"{processes} process{'es' * (processes > 1)} takes {train.micro_batch_size} x {train.grad_accum} x "
            f'{processes} = {wanted} per step: write {wanted} or "auto" there'
        )


def deepspeed_plugin(settings: DeepSpeedConfig, train: TrainConfig):
    """accelerate's DeepSpeedPlugin for distributed.deepspeed (a JSON file, or stage and offload),
    with the run's micro-batch size, gradient accumulation and clipping (train.*) where the file
    says "auto" or nothing. DeepSpeed accumulates and clips itself: lmforge's loop hands it each
    micro-batch's backward and steps it at the step's last (engine.loop)."""
    from accelerate import DeepSpeedPlugin

    if settings.config_file is not None:
        plugin = DeepSpeedPlugin(hf_ds_config=settings.config_file)
    else:
        offload = settings.offload
        plugin = DeepSpeedPlugin(
            zero_stage=settings.zero_stage,
            offload_optimizer_device=offload,
            offload_param_device=offload if settings.zero_stage == 3 else "none",
        )
    ours = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.max_grad_norm or 0.0,
    }
    config = plugin.deepspeed_config
    config.update({key: value for key, value in ours.items() if config.get(key, "auto") == "auto"})
    if config.get("train_batch_size") == "auto":  # DeepSpeed derives it: micro-batch x accumulation x processes
        del config["train_batch_size"]
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:  # final/ and evaluation gather the weights whole (DeepSpeed's own switch)
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return plugin


@contextmanager
def accelerate_sharding_off():
    """Hide `accelerate launch`'s FSDP switch while an Accelerator is made: lmforge shards the model
    itself (shard_model), and accelerate would otherwise wrap it a second time on a GPU."""
    saved = os.environ.pop("ACCELERATE_USE_FSDP", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["ACCELERATE_USE_FSDP"] = saved


def block_names(model: nn.Module) -> set[str]:
    """Class names of the model's transformer blocks: the `_no_split_modules` of the Hugging Face
    model inside (under a PEFT wrapper too), as accelerate's transformer_based_wrap reads them."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def shard_model(model: nn.Module, settings: FsdpConfig, mixed_precision: str) -> nn.Module:
    """Apply FSDP2 to `model` in place (each block, then the root) and return it.

    Its parameters become DTensors sharded over the job's processes along dim 0; build the
    optimizer after this. Mixed precision follows accelerate's "bf16": blocks compute in bf16 from
    fp32 master weights and gradients are reduced in fp32.

    Raises:
        UserError: the model names no transformer blocks to shard.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    names = block_names(model)
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise UserError(
            f"distributed.strategy=fsdp: {type(model).__name__} lists no transformer block classes "
            "(_no_split_modules) to shard; use distributed.strategy=ddp"
        )
    if settings.activation_checkpointing:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):  # frozen embeddings under adapters
            model.enable_input_require_grads()
    precision = {"bf16": torch.bfloat16}.get(mixed_precision)
    options = {
        "reshard_after_forward": settings.reshard_after_forward,
        "mp_policy": MixedPrecisionPolicy(param_dtype=precision, reduce_dtype=torch.float32 if precision else None),
        "offload_policy": CPUOffloadPolicy() if settings.cpu_offload else OffloadPolicy(),
    }
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 sharded `model` (its parameters are DTensors)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and persistent buffers are on the meta device (no memory):
    the shape into which `consolidate` loads the gathered weights at the end. Non-persistent buffers
    (rotary frequencies), which no state dict holds, are copied as they are (they are small)."""
    persistent = set(model.state_dict(keep_vars=True).values())
    memo: dict[int, object] = {}
    for tensor in list(model.parameters()) + [b for b in model.buffers() if b in persistent]:
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def consolidate(model: nn.Module, skeleton: nn.Module, main: bool) -> nn.Module | None:
    """Gather a sharded model's weights (FSDP2's, or a ZeRO-3 DeepSpeed engine's) into `skeleton`
    (a `meta_copy` made before sharding) on the main process: a plain model for evaluation and
    `final/`. Every process must call it (an all-gather); the others get None.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if type(model).__name__ == "DeepSpeedEngine":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.module.parameters()), modifier_rank=None):
            full = {k: v.detach().cpu().clone() for k, v in model.module.state_dict().items()} if main else None
    else:
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not main:
        return None
    _, unexpected = skeleton.load_state_dict(full, strict=False, assign=True)
    if hasattr(skeleton, "tie_weights"):  # assign=True replaced each tied name on its own
        skeleton.tie_weights()
    left = [name for name, t in skeleton.state_dict().items() if t.is_meta]
    if unexpected or left:
        raise RuntimeError(f"gathered weights do not fit the model: missing {left}, unexpected {unexpected}")
    return skeleton


def clip_sharded_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients of a sharded model to `max_norm` in total and return the total norm (a
    plain tensor): the norm of DTensor gradients is reduced over the processes first, as
    torchtitan does."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False, foreach=True)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_([p for p in model.parameters()], max_norm, total, foreach=True)
    return total
