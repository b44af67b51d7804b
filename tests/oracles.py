"""Derived assets made with the independent implementations (transformers, gptqmodel), cached
under $LLAMA_REF_HOME: shared by the test fixtures and benchmarks/perplexity_table.py."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import filelock

from llama_ref.files import atomic_output
from llama_ref.tools.assets import cache_home

# gptqmodel on a 2-core CPU: its worker pool needs the count, torch.compile and the C++ packer stay off.
# torch's threads are fixed too, whatever share of the cores the test worker has (conftest.py):
# the sums' order follows them, and a checkpoint made on one thread answered differently.
GPTQMODEL_ENV = {"GPTQMODEL_CPU_WORKERS": "2", "TORCHDYNAMO_DISABLE": "1", "GPTQMODEL_DISABLE_PACK_EXT": "1",
                 "OMP_NUM_THREADS": "2"}

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
    """SmolLM2-135M-Instruct as an HF fp16 safetensors checkpoint: transformers' float32
    dequantization of the GGUF (smollm2_checkpoint), cast to fp16 by transformers. That is
    byte for byte what transformers writes when it dequantizes the GGUF to fp16 itself
    (checked once), in a few seconds instead of another conversion."""
    import torch
    import transformers
    source = smollm2_checkpoint(gguf_file)

    def make(staging: Path) -> None:
        transformers.AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float16).save_pretrained(staging)
        transformers.AutoTokenizer.from_pretrained(str(source)).save_pretrained(staging)
    return derived(f"smollm2-135m-instruct-fp16-transformers{transformers.__version__}", make)


def smollm2_checkpoint(gguf_file: Path) -> Path:
    """SmolLM2-135M-Instruct dequantized from the GGUF by transformers, saved in float32 with
    transformers' tokenizer for the GGUF: made once, because transformers takes about 25 s to
    convert the GGUF and a second to read the result."""
    import torch
    import transformers

    def make(staging: Path) -> None:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32,
            quantization_config=transformers.GgufConfig(dequantize=True))
        model.hf_quantizer, model.is_quantized = None, False
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(staging)
        transformers.AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name
                                                   ).save_pretrained(staging)
    return derived(f"smollm2-135m-instruct-fp32-transformers{transformers.__version__}", make)


def derived(name: str, make) -> Path:
    """$LLAMA_REF_HOME/derived/name, made by make(staging directory) the first time and
    renamed into place whole (llama_ref.files.atomic_output). Test workers that ask for it at
    once take turns on a lock beside it: the later ones find it made."""
    target = cache_home() / "derived" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(target.parent / f".{name}.lock"):
        if not target.exists():
            with atomic_output(target, directory=True) as staging:
                make(staging)
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


# One process for every checkpoint: importing gptqmodel takes longer than loading and
# generating. argv: JSON [[checkpoint, prompt ids, new tokens], ...]; prints a JSON list of ids.
GENERATE_SCRIPT = """
import json, sys, torch
from gptqmodel import BACKEND, GPTQModel
answers = []
for directory, prompt, new_tokens in json.loads(sys.argv[1]):
    model = GPTQModel.load(directory, backend=BACKEND.TORCH, dtype=torch.float16, device="cpu")
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens)
    answers.append(out[0, ids.shape[1]:].tolist())
print(json.dumps(answers))
"""


def gptqmodel_greedy(requests: list, cwd) -> list[list[int]]:
    """gptqmodel's greedy ids for each (checkpoint, prompt ids, new tokens)."""
    result = subprocess.run([sys.executable, "-c", GENERATE_SCRIPT, json.dumps([[str(d), p, n] for d, p, n in requests])],
                            env={**os.environ, **GPTQMODEL_ENV}, capture_output=True, text=True, check=True, cwd=cwd)
    return json.loads(result.stdout.strip().splitlines()[-1])
