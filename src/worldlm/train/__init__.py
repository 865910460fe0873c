"""Local training and evaluation on one node."""
