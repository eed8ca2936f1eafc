"""Refusals of `bench eval --base-url` and `bench serve`, each one `error:` line and exit code 2 before any work.

The server-side refusals need a server that answers but lacks what scoring needs: a small stdlib HTTP server
standing in for another OpenAI-compatible implementation (one without prompt log-probabilities). The real vLLM
server's answers are tested in test_eval_vllm.py.
"""
from __future__ import annotations

import argparse
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from evaluators import cli, serve
from evaluators.openai_lm import api_root


def _eval(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return cli.main(p.parse_args(argv))


def _serve(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    return serve.main(p.parse_args(argv))


def _one_line(capsys, starts: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {starts}"), err
    assert "\n" not in err
    return err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NoLogprobs(BaseHTTPRequestHandler):
    """Lists one model and completes text, but returns no log-probabilities (as some servers do)."""

    def _json(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._json({"object": "list", "data": [{"id": "plain", "object": "model"}]})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._json({"choices": [{"index": 0, "text": " Paris", "logprobs": None, "finish_reason": "length"}]})

    def log_message(self, *args):
        pass


@pytest.fixture
def plain_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), NoLogprobs)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_api_root_forms():
    assert api_root("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert api_root("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000/v1"
    assert api_root("http://h:1/v1/completions") == "http://h:1/v1"


def test_nothing_behind_the_url(tmp_path, capsys, shared_data):
    url = f"http://127.0.0.1:{_free_port()}/v1"
    assert _eval(["--base-url", url, "--tasks", "piqa", "--data-root", str(shared_data),
                  "--results-dir", str(tmp_path)]) == 2
    err = _one_line(capsys, "base-url: nothing answers at")
    assert url in err and "bench serve" in err
    assert not list(tmp_path.iterdir())


def test_not_a_url(tmp_path, capsys, shared_data):
    assert _eval(["--base-url", "127.0.0.1:8000", "--tasks", "piqa", "--data-root", str(shared_data)]) == 2
    _one_line(capsys, "base-url: '127.0.0.1:8000' is not an http(s) URL")


def test_server_without_logprobs(plain_server, tmp_path, capsys, shared_data):
    assert _eval(["--base-url", plain_server, "--tasks", "piqa", "--data-root", str(shared_data),
                  "--results-dir", str(tmp_path)]) == 2
    err = _one_line(capsys, "base-url: the server at")
    assert "no prompt-token log-probabilities" in err and "generation tasks only" in err
    assert not list(tmp_path.iterdir())


def test_model_the_server_does_not_serve(plain_server, tmp_path, capsys, shared_data):
    assert _eval(["--base-url", plain_server, "--served-model", "global", "--tasks", "piqa",
                  "--data-root", str(shared_data), "--results-dir", str(tmp_path)]) == 2
    err = _one_line(capsys, "served-model: 'global' is not served at")
    assert "it serves plain" in err


def test_backend_and_url_go_together(capsys, shared_data):
    assert _eval(["--model", "default", "--backend", "openai", "--tasks", "piqa", "--data-root", str(shared_data)]) == 2
    _one_line(capsys, "backend: --backend openai and --base-url go together")
    assert _eval(["--model", "default", "--served-model", "x", "--tasks", "piqa", "--data-root", str(shared_data)]) == 2
    _one_line(capsys, "served-model: --served-model and --tokenizer go with --base-url")


def test_adapter_refusals(tmp_path, capsys, shared_data):
    assert _eval(["--model", "default", "--adapter", str(tmp_path), "--tasks", "piqa", "--backend", "hf",
                  "--data-root", str(shared_data)]) == 2
    _one_line(capsys, f"adapter: {tmp_path} is not a PEFT adapter folder")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "target_modules": ["lm_head"]}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    assert _eval(["--model", "default", "--adapter", str(tmp_path), "--tasks", "piqa", "--backend", "vllm",
                  "--data-root", str(shared_data)]) == 2
    assert "adapts lm_head" in _one_line(capsys, "adapter: ")
    run = tmp_path / "run"
    run.mkdir()
    assert _eval(["--run", str(run), "--adapter", "some/folder", "--tasks", "piqa", "--data-root", str(shared_data)]) == 2
    _one_line(capsys, "adapter: with --run pass global or clients")


def test_serve_refusals(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: default\n")
    assert _serve(["--run", str(run), "--adapters", "global"]) == 2
    assert "keeps no global adapter" in _one_line(capsys, f"adapters: {run / 'global_adapter'} does not exist")
    assert _serve(["--run", str(run), "--adapters", "clients"]) == 2
    assert "--save-client-adapters" in _one_line(capsys, "adapters: ")
    assert _serve(["--run", str(run)]) == 2
    _one_line(capsys, "run: ")  # no global_model/ yet
    assert _serve(["--model", "default", "--lora", "noequals"]) == 2
    _one_line(capsys, "lora: 'noequals' is not NAME=PATH")
    assert _serve(["--model", "default", "--lora", f"x={tmp_path}"]) == 2
    _one_line(capsys, "adapter x: ")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert _serve(["--model", "default", "--port", str(busy.getsockname()[1])]) == 2
        _one_line(capsys, "port: 127.0.0.1:")
