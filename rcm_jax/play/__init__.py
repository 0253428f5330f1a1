"""Streaming and play: the `sample` job's streaming path (stream_job) and the browser world model (server)."""
