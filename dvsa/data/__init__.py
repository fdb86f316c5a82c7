"""Dataset readers (Visual Genome, Karpathy split json), the synthetic world, shard I/O and
the Ray preparation job. See docs/data.md."""
