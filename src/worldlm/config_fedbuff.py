"""The `[nodes."PATH".fedbuff]` table: buffered asynchronous aggregation at one aggregator
(FedBuff, Nguyen et al. 2022), on a deterministic simulated clock or, deployed, on real clocks
(`worldlm.config`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from worldlm.config_section import Section


class SpeedConfig(Section):
    """How long a child trains, in simulated seconds, each time it is sent work."""

    distribution: Literal["lognormal", "constant"] = Field(
        "lognormal",
        description="lognormal: mean * exp(sigma z - sigma^2 / 2) with z ~ N(0, 1) drawn from "
        "(run seed, child path, dispatch count), so its mean is `mean`; constant: `mean`. "
        "Either is multiplied by the child's own `slowdown`.",
    )
    mean: float = Field(1.0, gt=0.0, description="Mean training duration (simulated seconds).")
    sigma: float = Field(
        0.5, ge=0.0, le=5.0, description="lognormal: spread (the log-duration's deviation)."
    )


class FedBuffConfig(Section):
    """Settings of `strategy = "fedbuff"`; ignored (and refused when set) under other rules."""

    clock: Literal["simulated", "real"] = Field(
        "simulated",
        description="simulated: children train at dispatch and their updates arrive on a "
        "deterministic simulated clock (`speed`, `slowdown`), in `worldlm run`; bit-exact and "
        "resumable bit for bit. real: updates arrive when they really do, over gRPC "
        "(`worldlm serve`/`join`, which refuse `simulated`); what a step folds depends on "
        "timing, so such a run is not bit-reproducible, and work in flight at a crash is lost "
        "(docs/fedbuff.md).",
    )
    buffer: int | None = Field(
        None,
        ge=1,
        description="K: updates folded into one server step; default min(10, concurrency) "
        "(the paper's K = 10). At most `concurrency`.",
    )
    concurrency: int | None = Field(
        None,
        ge=1,
        description="Children training at once; default all children. At most the number "
        "of children.",
    )
    staleness: Literal["sqrt", "none", "poly"] = Field(
        "sqrt",
        description="Weight of an update s steps stale: sqrt = 1/sqrt(1+s) (the paper's), "
        "none = 1, poly = (1+s)^-exponent.",
    )
    exponent: float = Field(0.5, ge=0.0, description="poly: the exponent a of (1+s)^-a.")
    max_staleness: int | None = Field(
        None,
        ge=0,
        description="Drop (record and audit) an update more than this many server steps "
        "stale; default none dropped.",
    )
    server_lr: float = Field(
        1.0,
        gt=0.0,
        description="Server learning rate: model += server_lr * sum_i w_i s_i delta_i / sum_i w_i.",
    )
    speed: SpeedConfig = Field(
        default_factory=SpeedConfig,
        description="The simulated clock: each child's training duration per dispatch "
        "(clock = 'simulated' only).",
    )
