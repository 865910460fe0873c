"""Leaf data: read documents, split train/validation, tokenize, pack token blocks."""
