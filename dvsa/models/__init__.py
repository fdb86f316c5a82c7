"""The paper's models: image encoder (eq. 1), alignment model (eq. 2-9), MRF snippet alignment
(eq. 10-12), multimodal RNN / LSTM captioner (eq. 13-15) and its decoders."""
