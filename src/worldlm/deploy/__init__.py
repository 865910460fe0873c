"""Deployment: each node of the tree as its own process, linked by gRPC with mutual TLS."""
