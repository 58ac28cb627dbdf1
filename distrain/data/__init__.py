"""The data path: shard index and writer, shard lists, the stream, decode, device-side batch ops."""
