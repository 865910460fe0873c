"""Privacy building blocks: user-level differential privacy (clipping, noise, accounting).

They wrap an aggregation rather than living inside strategies (DP-FedAvg, McMahan et al. 2018;
adaptive clipping, Andrew et al. 2021).
"""
