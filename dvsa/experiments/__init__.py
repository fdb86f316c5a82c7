"""The paper's experiments beyond training one model (see docs/experiments.md).

- :mod:`.snippets`: section 3.1.4 / 4.3. MRF snippet alignment over a shard set as a Ray
  Data batch-inference job, written as region-snippet shards (the shard contract, regions =
  inferred snippets) on which ``dvsa train-caption caption.mode=region`` trains; Fig. 5.
- :mod:`.word_alignment`: on ``dvsa synth`` data, word-to-true-box accuracy of the alignment
  model before (per-word argmax) and after MRF smoothing, against chance.
- :mod:`.baselines`: Table 4: the ranking (nearest-neighbour) baseline and BLEU-1..4 of
  captioners on region annotations, in one table.
- :mod:`.ablations`: Table 1: retrieval with the BRNN vs the bag-of-words encoder and
  eq. 8 vs eq. 7, trained through the same train-align job, read back from MLflow.
"""
