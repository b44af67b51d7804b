"""Derived assets made with the independent implementations (transformers, gptqmodel), cached
under $LLAMA_REF_HOME: shared by the test fixtures and benchmarks/perplexity_table.py."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from llama_ref.tools.assets import cache_home

# gptqmodel on a 2-core CPU: its worker pool needs the count, torch.compile and the C++ packer stay off.
GPTQMODEL_ENV = {"GPTQMODEL_CPU_WORKERS": "2", "TORCHDYNAMO_DISABLE": "1", "GPTQMODEL_DISABLE_PACK_EXT": "1"}

# Calibration is texts (str) or token-id lists; options go to QuantizeConfig as they are. The
# dtype is the one gptqmodel runs the calibration forward in and saves unquantized tensors in.
QUANTIZE_SCRIPT = """
import json, sys, torch
from gptqmodel import GPTQModel, QuantizeConfig
source, target, options, calibration, dtype = (sys.argv[1], sys.argv[2], json.loads(sys.argv[3]),
                                               json.load(open(sys.argv[4])), getattr(torch, sys.argv[5]))
model = GPTQModel.load(source, QuantizeConfig(bits=4, **options), device="cpu", dtype=dtype)
model.quantize(calibration, batch_size=4)
model.save(target)
"""


def smollm2_fp16_checkpoint(gguf_file: Path) -> Path:
    """SmolLM2-135M-Instruct as an HF fp16 safetensors checkpoint, dequantized from the GGUF by
    transformers (about a minute the first time)."""
    import torch
    import transformers
    target = cache_home() / "derived" / f"smollm2-135m-instruct-fp16-transformers{transformers.__version__}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float16,
            quantization_config=transformers.GgufConfig(dequantize=True))
        model.hf_quantizer, model.is_quantized = None, False
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(staging)
        transformers.AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name
                                                   ).save_pretrained(staging)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def gptqmodel_quantize(source: Path, target: Path, options: dict, calibration: list,
                       dtype: str = "float16") -> Path:
    """gptqmodel 7.7.0's GPTQ on CPU, written to target (with the source's tokenizer files).
    float16 (not gptqmodel's default bf16) keeps the unquantized tensors at the source's values
    and dtype; float32 keeps their values too and runs the calibration forward about 6x faster
    on this kind of CPU, which has no fp16 arithmetic."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    try:
        (staging / "calibration.json").write_text(json.dumps(calibration))
        # cwd: gptqmodel writes a logs/ directory wherever it runs.
        subprocess.run([sys.executable, "-c", QUANTIZE_SCRIPT, str(source), str(staging / "model"),
                        json.dumps(options), str(staging / "calibration.json"), dtype],
                       env={**os.environ, **GPTQMODEL_ENV}, cwd=staging, check=True, capture_output=True,
                       timeout=3600)
        for name in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]:
            if (source / name).exists() and not (staging / "model" / name).exists():
                shutil.copy(source / name, staging / "model" / name)
        os.replace(staging / "model", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
