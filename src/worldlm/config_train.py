"""The `[train]` section: a leaf's local optimization, its precision and memory trade-offs,
and the local trainer it runs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from worldlm.config_section import Section


class TrainConfig(Section):
    local_steps: int = Field(20, ge=1, description="Optimizer steps per leaf per round.")
    batch_size: int = Field(8, ge=1, description="Blocks per step.")
    lr: float = Field(1e-3, gt=0.0, description="Peak learning rate of AdamW.")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Cosine floor as a share of lr.")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps at each leaf.")
    weight_decay: float = Field(0.1, ge=0.0, description="AdamW decay on matrices only.")
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW first-moment decay.")
    beta2: float = Field(0.95, ge=0.0, lt=1.0, description="AdamW second-moment decay.")
    grad_clip: float = Field(1.0, ge=0.0, description="Max global grad norm; 0 = off.")
    keep_optimizer_state: bool = Field(True, description="Keep AdamW moments across rounds.")
    grad_accum_steps: int = Field(
        1,
        ge=1,
        description="Micro-batches per step: batch_size blocks are split into this many, each "
        "run forward and backward on its own and weighted by its share of the step's target "
        "tokens, so a step equals one batch of batch_size up to float rounding with 1/N of "
        "the activation memory. Must divide batch_size.",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="auto: bf16 autocast over fp32 weights on CUDA (fp32 master weights and "
        "moments), fp32 on the CPU. fp32: no autocast anywhere. bf16: weights, gradients and "
        "AdamW moments in bfloat16 on every node of the run (the federation's models too): half "
        "the memory of weights, gradients and moments and half the bytes on the links to and "
        "from leaves (inner aggregators forward their sums in float32), at bf16's 8-bit "
        "mantissa for the updates (small steps can round away). Not with a quantized base.",
    )
    activation_checkpointing: bool = Field(
        False,
        description="Recompute each transformer block's activations in the backward pass "
        "instead of keeping them (transformers' gradient checkpointing): activation memory "
        "falls from one copy per layer to about one layer's, for about a third more compute "
        "per step. The same gradients up to float rounding.",
    )
    compile: bool = Field(
        False,
        description="torch.compile the model a leaf trains (the first round pays the "
        "compilation, tens of seconds; later steps run fused kernels). Needs a C compiler on "
        "CPU. The same results up to float rounding.",
    )
    shard: Literal["none", "fsdp"] = Field(
        "none",
        description="A leaf trained on several processes (torchrun, or run.leaf_ranks on Ray; "
        'README "Several GPUs"): '
        "none = each rank holds the whole model, gradients and moments (DDP); fsdp = they are "
        "split over the ranks (PyTorch FSDP2, per transformer block): about 1/N of their memory "
        "per rank, for gathering each block's weights in its forward and backward. The leaf "
        "still sends its parent the whole model, and its moments are gathered to rank 0's host "
        "memory at each round's end (in its checkpoints, as with DDP). The same training up to "
        "float rounding. Not with compile or a quantized base; one process: nothing to shard.",
    )
    trainer: str = Field(
        "standard",
        min_length=1,
        description="The local trainer each leaf runs (worldlm.register_local_trainer): "
        "standard = AdamW, warmup + cosine, clipping, and FedProx when prox_mu > 0. A plugin's "
        "trainer needs its module in run.plugins.",
    )
    prox_mu: float = Field(
        0.0,
        ge=0.0,
        description="FedProx (Li et al. 2020): adds (mu/2)·||w − w_received||² to each local "
        "step's loss, w_received being the model the leaf starts the round from; over the "
        "trainable parameters only (with LoRA: the adapters). 0 = off, plain local training.",
    )
    finetune_rounds: int | None = Field(
        None,
        ge=0,
        description="A personalization phase: in the last N root rounds each leaf fine-tunes the "
        "model it would deploy on its own data and keeps and deploys all of it (the weights it "
        "sends up are the ones it received, so nothing trained in the phase leaves it). The same "
        "local steps as a federated round; must be fewer than stop.rounds. 0 = off. Unset: the "
        "method's default, a fifth of the rounds for worldlm (docs/study.md) and none for the "
        "other methods.",
    )

    @model_validator(mode="after")
    def _whole_micro_batches(self) -> TrainConfig:
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(
                f"grad_accum_steps = {self.grad_accum_steps} must divide batch_size = "
                f"{self.batch_size} (micro-batches are equal parts of a step's batch)"
            )
        if self.shard == "fsdp" and self.compile:
            raise ValueError(
                'shard = "fsdp" does not yet run a compiled model; set compile = false (or '
                'shard = "none", DDP, which does)'
            )
        return self
