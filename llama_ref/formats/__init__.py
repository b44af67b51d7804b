"""Checkpoint formats: safetensors, HF directories (dense and GPTQ), GGUF files."""
