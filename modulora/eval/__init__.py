"""Evaluation: perplexity over fixed windows (`perplexity.py`) and task metrics (`tasks.py`)."""
