"""The model's math: element-wise ops, RoPE, the Linear layers and the forward pass."""
