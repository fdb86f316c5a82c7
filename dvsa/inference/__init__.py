"""Inference with trained models: checkpoint loading, alignment (eq. 1-12), box captioning and
region search. Used by evaluation, experiments and the ``dvsa`` commands; imports only models,
ingest, data and the bottom-level modules."""
