"""`leanfit lstm`: a character- (or byte-) level LSTM language model, trained with truncated backpropagation
through time on `lstm_core.LSTM` and the linear cross-entropy (data.py, model.py, loop.py, outputs.py)."""
