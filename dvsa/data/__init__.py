"""Dataset readers (Visual Genome, Karpathy split json), the synthetic world, shard I/O, the
shard-set contract (:mod:`dvsa.data.manifest`) and the Ray preparation job. See docs/data.md."""
