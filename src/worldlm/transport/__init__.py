"""How a parent reaches its children: the protocol, and the in-process reference."""
