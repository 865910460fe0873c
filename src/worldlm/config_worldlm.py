"""The `[worldlm]` section: key layers K, their aggregation and routing (`worldlm.config`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from worldlm.config_section import Section


class WorldLMConfig(Section):
    # The defaults below are the best configuration measured in docs/study.md: key_fraction 1,
    # each leaf's own K started halfway toward its sub-federation's K, that K the children's
    # mean (attention off), and a personalization phase (train.finetune_rounds). The paper's
    # (0.3, attention, leaves deploy the sub-federation's K) scored 22.5 against 17.4 on the
    # languages tree with 50k characters per leaf.
    key_fraction: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Share of transformer blocks (the last ones) in K, with the final norm; the "
        "embeddings are always in B, so 1 means every block is personalized per sub-federation "
        "and only the embeddings are averaged across the whole tree.",
    )
    # Attention earns no place at this scale (docs/study.md: turning it off lowered the mean on
    # both trees, at every seed measured), so a sub-federation's K is its children's mean.
    attention: bool = Field(
        False,
        description="A sub-federation's K is an attention mix of its children's K (closer "
        "children weigh more; the paper's method), rather than their token-weighted mean. "
        "Needed by child_key_layers = 'attended' and by routing (lambda_route > 0).",
    )
    tau: float = Field(1.0, gt=0.0, description="Attention temperature over children's K.")
    eps: float = Field(1.0, gt=0.0, le=1.0, description="Step of K_p toward the attended K.")
    leaf_key_layers: Literal["federation", "own"] = Field(
        "own",
        description="A leaf deploys its sub-federation's K, or its own K as last trained.",
    )
    key_mix: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description=(
            "With leaf_key_layers = 'own': where a leaf's round starts its K, this share of the "
            "way from its own last-trained K toward the K it is sent (1: the K it is sent; 0: "
            "its own, like FedPer, though its K still goes up to be attended over)."
        ),
    )
    # Measured (docs/study.md): keeping the embeddings too lowered the mean on both trees at
    # seed 0 (languages 17.4 -> 16.5, families 14.0 -> 13.5), on every leaf or level; a leaf
    # whose script no sibling shares (Russian among Latin-script leaves) gained most.
    key_mix_scope: Literal["keys", "all"] = Field(
        "all",
        description=(
            "With leaf_key_layers = 'own': which weights a leaf keeps between rounds and starts "
            "key_mix of the way toward what it is sent: K only, or every weight (the embeddings "
            "too, toward the tree's average)."
        ),
    )
    child_key_layers: Literal["shared", "attended"] = Field(
        "shared",
        description=(
            "K an aggregator sends each child: its own K_p, or (with attention) per child an "
            "attention mix of all children's K seen from that child (it then keeps one K per "
            "child, after FedAMP)."
        ),
    )
    residual_rank: int = Field(4, ge=1, description="Rank of each key-layer matrix's residual.")
    route_top_k: int = Field(1, ge=1, description="Similar sub-federations routed to each one.")
    route_tau: float = Field(1.0, gt=0.0, description="Temperature of the routing softmax.")
    # Measured (tiny model, default tree, 3 rounds): mean leaf ppl 885 at 0, 897 at 0.1, 1022 at
    # 0.5 -- routing between two dissimilar sub-federations only blurs their K, so it is off
    # until a tree with several similar sub-federations shows it helps (issue 3's study).
    lambda_route: float = Field(
        0.0, ge=0.0, description="Scale of routed residuals in K attention; 0 = no routing."
    )

    @model_validator(mode="after")
    def _routing_needs_attention(self) -> WorldLMConfig:
        if self.child_key_layers == "attended" and not self.attention:
            raise ValueError(
                "worldlm.child_key_layers = 'attended' mixes each child's K by attention; "
                "set worldlm.attention = true, or child_key_layers = 'shared'"
            )
        if self.lambda_route > 0 and not self.attention:
            raise ValueError(
                "worldlm.lambda_route > 0 routes residuals into the attention over K; "
                "set worldlm.attention = true, or lambda_route = 0"
            )
        return self
