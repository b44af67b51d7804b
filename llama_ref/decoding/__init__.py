"""From logits to text: sampling parameters, the sampler, stopping, constraints, chat
formats and the generation loop."""
