"""The peers the kit's reports are made against, built from the project's own files and
cached under $LLAMA_REF_HOME/peers (docs/conformance.md, "Peers"):

    llama-server        llama.cpp's own server, built with cmake from the llama.cpp sources
                        inside llama-cpp-python's source distribution (vendor/llama.cpp)
    llama-cpp-python    llama-cpp-python's OpenAI-compatible server, in a venv of its own
                        (its [server] extra pins older web libraries than ours)

Both serve a GGUF file; `start` runs one on a port and waits until it answers.
"""
import hashlib
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import httpx
from llvmlite import binding

from ..files import atomic_output
from ..server.thread import free_port
from ..tools.assets import AssetError, cache_home, download_package

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
PEERS = ("llama-server", "llama-cpp-python")
# This CPU's instructions but AMX: on a 2-vCPU Xeon VM whose kernel grants AMX, llama.cpp's
# AMX matrix product crashed at its first tile instruction (ldtilecfg) as the model loaded.
# GCC lets an explicit -mno-* win over the -march=native that GGML_NATIVE adds after it.
NATIVE_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
NATIVE_OPTIONS = ["-DGGML_NATIVE=ON", f"-DCMAKE_C_FLAGS={NATIVE_FLAGS}", f"-DCMAKE_CXX_FLAGS={NATIVE_FLAGS}"]
# llama.cpp's build options: one static binary, no web UI download (the default fetches a
# prebuilt UI), no libcurl, no tests or examples.
CMAKE_OPTIONS = ["-DCMAKE_BUILD_TYPE=Release", *NATIVE_OPTIONS, "-DBUILD_SHARED_LIBS=OFF",
                 "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON"]


def peers_home() -> Path:
    return cache_home() / "peers"


def build_tag() -> str:
    """The CPU a native build is for and how it was built, named in its cache directory: a
    binary built with one CPU's instructions can crash on another, and the cache can outlive
    the machine it was made on."""
    features = ",".join(sorted(name for name, on in binding.get_host_cpu_features().items() if on))
    digest = hashlib.sha256(f"{features} {CMAKE_OPTIONS}".encode()).hexdigest()[:8]
    return f"{binding.get_host_cpu_name()}-{digest}"


def run_logged(command: list[str], log: Path, **kwargs) -> None:
    with open(log, "a") as out:
        out.write(f"$ {' '.join(map(str, command))}\n")
        out.flush()
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, **kwargs)
    if result.returncode != 0:
        raise AssetError(f"{' '.join(map(str, command[:3]))}... failed (exit {result.returncode}); see {log}")


def llama_server(progress: bool = False) -> Path:
    """The llama-server binary, built once per CPU (about 10 minutes on 2 cores)."""
    target = peers_home() / f"llama-server-0.3.36-{build_tag()}" / "llama-server"
    if target.exists():
        return target
    log = peers_home() / "llama-server-build.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=peers_home(), prefix=".build-") as tmp:
        archive = download_package(LLAMA_CPP_PYTHON, Path(tmp), "sdist", progress)
        with tarfile.open(archive) as t:
            t.extractall(tmp, filter="data")
        source = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = Path(tmp) / "build"
        run_logged(["cmake", "-S", str(source), "-B", str(build), *CMAKE_OPTIONS], log)
        run_logged(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 1)], log)
        with atomic_output(target) as part:
            (build / "bin" / "llama-server").rename(part)
    return target


def llama_cpp_python(progress: bool = False) -> Path:
    """The python of a venv holding llama-cpp-python[server], built once for this CPU."""
    venv = peers_home() / f"llama-cpp-python-0.3.36-{build_tag()}"
    if (venv / "bin" / "python").exists():
        return venv / "bin" / "python"
    log = peers_home() / "llama-cpp-python-build.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(venv, directory=True) as staging:
        run_logged([sys.executable, "-m", "venv", str(staging)], log)
        run_logged([str(staging / "bin" / "python"), "-m", "pip", "install", "--quiet",
                    f"llama-cpp-python[server]=={LLAMA_CPP_PYTHON.split('==')[1]}"], log,
                   env={**os.environ, "CMAKE_ARGS": shlex.join(NATIVE_OPTIONS)})
    return venv / "bin" / "python"


def command(name: str, gguf: Path, port: int, context: int, parallel: int = 2) -> list[str]:
    """How the peer is started: its defaults, except the context: each of llama-server's
    `parallel` slots (two, so that n = 2 is served) holds `context` positions."""
    if name == "llama-server":
        return [str(llama_server()), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                "-c", str(parallel * context), "-np", str(parallel)]
    if name == "llama-cpp-python":
        return [str(llama_cpp_python()), "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                "--port", str(port), "--n_ctx", str(context)]
    raise ValueError(f"peer must be one of {', '.join(PEERS)}; got {name!r}")


def start(name: str, gguf: Path, context: int, timeout: float = 300.0,
          parallel: int = 2) -> tuple[subprocess.Popen, str, list[str]]:
    """(process, base URL, command) of the peer serving `gguf`, once its /v1/models answers."""
    port = free_port()
    argv = command(name, gguf, port, context, parallel)
    return (*launch(name, argv, port, timeout), argv)


def launch(name: str, argv: list[str], port: int, timeout: float = 300.0) -> tuple[subprocess.Popen, str]:
    """(process, base URL) of a server started with argv on 127.0.0.1:port, once its
    /v1/models answers; its output goes to name.log in the peers' directory."""
    peers_home().mkdir(parents=True, exist_ok=True)      # a fresh machine has no cache yet
    log = open(peers_home() / f"{name}.log", "w")
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssetError(f"{name} exited with {process.returncode}; see {log.name}")
        try:
            if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.terminate()
    raise AssetError(f"{name} did not answer within {timeout:.0f} s; see {log.name}")


if __name__ == "__main__":   # make peers: build both once
    print(llama_server(progress=True))
    print(llama_cpp_python(progress=True))
