"""The staging ring of GPU loads: :mod:`.ring` (page-aligned host slots, pinned for CUDA, handed out again only
after their copy's fence completed), :mod:`.scheduler` (a plan cut into slot-sized pieces, streamed from a
reader through the ring into a sink, checksums verified on the slots) and :mod:`.sinks` (CUDA streams and
events). Nothing here knows about tensors of a state_dict or about files."""
