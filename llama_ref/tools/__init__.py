"""Offline tools: registry assets, the quantizer, perplexity, the benchmark, synthetic checkpoints."""
