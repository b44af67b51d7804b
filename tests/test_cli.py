"""The command line, run as a user runs it."""
import json
import signal
import subprocess
import sys

import pytest

import torch

from conftest import load_reference


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "llama_ref.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_prints_transformers_greedy_tokens(checkpoint):
    directory = checkpoint("gqa")
    prompt = [1, 17, 42, 99]
    result = run_cli("generate", "--model", str(directory), "--prompt-ids", " ".join(map(str, prompt)),
                     "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr
    expected = load_reference(directory).generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                                  eos_token_id=2, pad_token_id=0)[0, len(prompt):]
    assert [int(t) for t in result.stdout.split()] == expected.tolist()


def test_errors_are_one_line_without_traceback_unless_debug(tmp_path):
    result = run_cli("generate", "--model", str(tmp_path / "missing"), "--prompt-ids", "1")
    assert result.returncode == 1    # a bad model or file
    assert result.stderr.startswith("llama-ref: error: ") and "Traceback" not in result.stderr
    result = run_cli("generate", "--model", str(tmp_path), "--prompt-ids", "1 x")
    assert result.returncode == 2 and "--prompt-ids: expected integers" in result.stderr   # a bad flag
    result = run_cli("--debug", "generate", "--model", str(tmp_path / "missing"), "--prompt-ids", "1")
    assert result.returncode == 1 and "Traceback" in result.stderr and "CheckpointError" in result.stderr


def interruptible():
    """A job that a shell started in the background (`cmd &`) inherits SIGINT ignored, and so
    would the chat: Ctrl-C as a terminal user sends it needs the default disposition."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_interactive_chat_streams_and_survives_ctrl_c(tmp_path):
    import pexpect
    from llama_ref.tools.synth import llama2_tokenizer_model
    from conftest import make_checkpoint

    directory = make_checkpoint(tmp_path / "m", overrides=dict(vocab_size=32000, eos_token_id=None,
                                                               max_position_embeddings=4096))
    (directory / "tokenizer.model").write_bytes(llama2_tokenizer_model())
    chat = pexpect.spawn(sys.executable, ["-m", "llama_ref.cli", "chat", "--model", str(directory),
                                          "--max-new-tokens", "3000", "--temperature", "1", "--seed", "1"],
                         encoding="utf-8", timeout=120, preexec_fn=interruptible)
    chat.expect("> ")
    chat.sendline("Tell me a very long story")
    chat.expect("story\r\n")           # the terminal's echo of the line
    chat.expect(r"\S")                 # then the answer streams
    chat.sendintr()                    # Ctrl-C in the middle of it
    chat.expect(r"\[stopped\]")
    chat.expect("> ")                   # and the program asks for the next turn
    chat.sendline("/system Be brief.")
    chat.expect("> ")
    chat.sendline("/exit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_generate_text_with_the_model_tokenizer(tmp_path, mistral_spm_model):
    """A checkpoint with a real tokenizer: --prompt text in, the detokenized greedy text out."""
    from conftest import make_checkpoint
    from llama_ref.tokenizer import load_tokenizer

    directory = make_checkpoint(tmp_path / "m", overrides=dict(vocab_size=32000, eos_token_id=None))
    (directory / "tokenizer.model").write_bytes(mistral_spm_model.read_bytes())
    tokenizer = load_tokenizer(directory)
    prompt = tokenizer.encode("The capital of France is", bos=True, eos=False)
    expected_ids = load_reference(directory).generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                                      eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    if tokenizer.eos_id in expected_ids:  # the CLI stops at end-of-sequence when given text
        expected_ids = expected_ids[:expected_ids.index(tokenizer.eos_id)]
    result = run_cli("generate", "--model", str(directory), "--prompt", "The capital of France is",
                     "--max-new-tokens", "10")
    assert result.returncode == 0, result.stderr
    assert result.stdout == tokenizer.decode(prompt + expected_ids)[len(tokenizer.decode(prompt)):] + "\n"


def test_sampling_flags_are_validated_before_the_model_loads(tmp_path):
    result = run_cli("generate", "--model", str(tmp_path / "missing"), "--prompt-ids", "1", "--top-p", "0")
    assert result.returncode == 2 and "top_p must be in (0, 1]" in result.stderr


def test_seeded_sampling_is_reproducible_and_reports_its_seed(checkpoint):
    args = ("generate", "--model", str(checkpoint("gqa")), "--prompt-ids", "1 5 9", "--temperature", "0.9",
            "--seed", "3", "--max-new-tokens", "8")
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0 and first.stdout == second.stdout and "seed: 3]" in first.stderr


def test_text_prompt_needs_a_tokenizer(checkpoint):
    result = run_cli("generate", "--model", str(checkpoint("mha")), "--prompt", "hello")
    assert result.returncode == 2 and "has no tokenizer" in result.stderr


def test_generate_json_events(checkpoint):
    result = run_cli("generate", "--model", str(checkpoint("gqa")), "--prompt-ids", "1 5 9", "--max-new-tokens", "4",
                     "--json")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 0 and len(lines) == 5
    assert [e["token_id"] for e in lines[:-1]] and lines[-1]["completion_tokens"] == 4
    assert lines[-1]["finish_reason"] == "length" and lines[3]["finish_reason"] == "length"


@pytest.mark.slow
def test_fetch_then_chat_with_the_default_model_says_paris():
    fetched = run_cli("fetch", "default")
    assert fetched.returncode == 0 and fetched.stdout.strip().endswith(".gguf")
    result = run_cli("generate", "--chat", "--prompt", "What is the capital of France?", "--temperature", "0")
    assert result.returncode == 0 and "Paris" in result.stdout
