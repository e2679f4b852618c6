"""Real models built from configs with random weights, exported with torch.onnx (see corpus.py)."""
