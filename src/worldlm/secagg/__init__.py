"""Secure aggregation: the server learns only the sum of the surviving clients' inputs.

Bonawitz et al. 2017 ("Practical Secure Aggregation for Privacy-Preserving Machine Learning")
with the SecAgg+ neighbourhood graph of Bell et al. 2020 ("Secure Single-Server Aggregation
with (Poly)Logarithmic Overhead"), honest-but-curious server. Transport-independent: the
client and server are state machines that exchange the plain-data messages of `messages`;
`simulate.run_secagg` runs a whole round in one process.
"""

from __future__ import annotations

from worldlm.secagg.client import SecAggClient
from worldlm.secagg.cost import CostRow, measure_cost
from worldlm.secagg.errors import (
    SecAggAborted,
    SecAggError,
    SecAggProtocolError,
    SecAggRefused,
    SecAggSetupError,
)
from worldlm.secagg.messages import (
    AdvertiseKeys,
    ClientSetup,
    KeysBroadcast,
    MaskedInput,
    ShareKeys,
    SharesDelivery,
    Stage,
    UnmaskingShares,
    UnmaskRequest,
    wire_size,
)
from worldlm.secagg.plan import RoundPlan, plan_round
from worldlm.secagg.quantize import Quantizer
from worldlm.secagg.server import MaskedSum, SecAggServer
from worldlm.secagg.simulate import SecAggResult, run_secagg

__all__ = [
    "AdvertiseKeys",
    "ClientSetup",
    "CostRow",
    "KeysBroadcast",
    "MaskedInput",
    "MaskedSum",
    "Quantizer",
    "RoundPlan",
    "SecAggAborted",
    "SecAggClient",
    "SecAggError",
    "SecAggProtocolError",
    "SecAggRefused",
    "SecAggResult",
    "SecAggServer",
    "SecAggSetupError",
    "ShareKeys",
    "SharesDelivery",
    "Stage",
    "UnmaskRequest",
    "UnmaskingShares",
    "measure_cost",
    "plan_round",
    "run_secagg",
    "wire_size",
]
