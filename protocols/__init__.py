"""Everything that crosses the wire: protobuf messages, the tensor codec, RPC names and error tags."""
