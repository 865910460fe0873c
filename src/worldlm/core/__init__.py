"""The types every layer shares: model state, the messages that cross a link, the transport
protocol and its in-process reference, a leaf's data, and the chunked tensor helpers. Nothing
here imports another worldlm package but `errors` and `secagg`'s message types: everything else
builds on it (tests/test_boundaries.py checks it)."""
