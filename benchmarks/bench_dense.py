"""Load time, peak RSS and decode speed of a dense fp16 checkpoint, against physical limits.

    python benchmarks/bench_dense.py [--layers 22 --hidden 2048 --intermediate 5632 ...]

The default shape is TinyLlama-1.1B's (2.2 GB in fp16), with random weights written once
to $LLAMA_REF_HOME/bench/, measured as `llama-ref bench` measures (llama_ref/tools/bench.py: a
fresh process, 128-token prefill, 32 tokens decoded after 16). Two ratios are printed:
  - peak RSS / checkpoint file size (target: <= 1.2; the weights are memory-mapped), and
  - the memory bandwidth decoding implies (weight bytes read per token * tokens/s) over the
    read bandwidth of this machine measured in the same run (a parallel sum over 1 GiB):
    batch-1 decoding reads every weight once per token, so 1.0 is the ceiling.
"""
import argparse
import json
import os
from pathlib import Path

import numpy as np

from llama_ref.files import atomic_output
from llama_ref.tools.assets import cache_home
from llama_ref.tools.bench import DECODE, PREFILL, PROMPT, read_bandwidth, run_once

HOME = cache_home()


def write_checkpoint(directory: Path, args) -> None:
    """A random fp16 Llama checkpoint, written to a temporary name and renamed when complete."""
    from safetensors.numpy import save_file
    rng = np.random.default_rng(0)
    hidden, inter, d = args.hidden, args.intermediate, args.hidden // args.heads
    kv = args.kv_heads * d

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    tensors = {"model.embed_tokens.weight": w(args.vocab, hidden), "lm_head.weight": w(args.vocab, hidden),
               "model.norm.weight": np.ones(hidden, np.float16)}
    for i in range(args.layers):
        p = f"model.layers.{i}."
        tensors.update({p + "input_layernorm.weight": np.ones(hidden, np.float16),
                        p + "post_attention_layernorm.weight": np.ones(hidden, np.float16),
                        p + "self_attn.q_proj.weight": w(hidden, hidden), p + "self_attn.k_proj.weight": w(kv, hidden),
                        p + "self_attn.v_proj.weight": w(kv, hidden), p + "self_attn.o_proj.weight": w(hidden, hidden),
                        p + "mlp.gate_proj.weight": w(inter, hidden), p + "mlp.up_proj.weight": w(inter, hidden),
                        p + "mlp.down_proj.weight": w(hidden, inter)})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
              "num_key_value_heads": args.kv_heads, "vocab_size": args.vocab, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2}
    with atomic_output(directory, directory=True) as partial:
        save_file(tensors, str(partial / "model.safetensors"))
        (partial / "config.json").write_text(json.dumps(config, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()

    name = f"llama-fp16-l{args.layers}-h{args.hidden}-i{args.intermediate}-a{args.heads}-kv{args.kv_heads}-v{args.vocab}"
    directory = HOME / "bench" / name
    if not directory.exists():
        print(f"writing {directory} ...", flush=True)
        write_checkpoint(directory, args)
    file_size = (directory / "model.safetensors").stat().st_size
    result = run_once("ours", directory, os.cpu_count())
    bandwidth = read_bandwidth(os.cpu_count())
    implied = result["decode_tok_s"] * file_size  # every weight byte is read once per decoded token
    print(f"checkpoint        {directory.name}: {file_size / 1e9:.2f} GB fp16")
    print(f"load time         {result['load_s']:.2f} s")
    print(f"peak RSS          {result['peak_rss'] / 1e9:.2f} GB = {result['peak_rss'] / file_size:.2f} x file size"
          f" (target <= 1.2)")
    print(f"prefill           {result['prefill_tok_s']:.1f} tokens/s ({PREFILL}-token prompt)")
    print(f"decode            {result['decode_tok_s']:.2f} tokens/s ({DECODE} tokens after {PROMPT})")
    print(f"bandwidth         decode implies {implied / 1e9:.1f} GB/s; this machine reads {bandwidth / 1e9:.1f} GB/s"
          f" -> {implied / bandwidth:.2f} of the ceiling")


if __name__ == "__main__":
    main()
