"""Streaming: Kafka source/sink, example codec, joiner, local broker launcher."""
