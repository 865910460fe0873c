"""The round engine: select children, dispatch tasks, collect and aggregate updates."""
