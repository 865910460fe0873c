"""Transport security for federation nodes: a development CA and mutual-TLS node certificates."""
