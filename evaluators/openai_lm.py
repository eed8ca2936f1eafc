"""The openai backend: score a model that an OpenAI-compatible server serves (`bench serve`, or vLLM elsewhere).

lm-eval's `local-completions` model does the scoring: log-likelihood tasks send each context + continuation as one
prompt with echo and logprobs (the server must return prompt-token log-probabilities; vLLM does), generation
tasks ask for completions. `check_server` probes the server before any work so that a wrong URL, a server without
prompt log-probabilities or a model name it does not serve is one `error:` line, not a stack trace minutes later.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request

from bench import BenchError

PROBE_TIMEOUT_S = 10
REQUEST_TIMEOUT_S = 600
BATCH = 16        # prompts per HTTP request
CONCURRENT = 4    # requests in flight: keeps the server's batch full while responses are parsed here


def api_root(base_url: str | None) -> str:
    """'http://h:p', 'http://h:p/v1' or 'http://h:p/v1/completions' -> 'http://h:p/v1'."""
    if not base_url:
        raise BenchError("base-url: the openai backend needs --base-url http://HOST:PORT/v1 (e.g. what "
                         "`bench serve` prints)")
    u = urllib.parse.urlparse(base_url)
    if u.scheme not in ("http", "https") or not u.netloc:
        raise BenchError(f"base-url: {base_url!r} is not an http(s) URL; pass e.g. http://127.0.0.1:8000/v1")
    path = u.path.rstrip("/")
    for tail in ("/completions", "/chat/completions"):
        if path.endswith(tail):
            path = path[: -len(tail)]
    if not path.endswith("/v1"):
        path += "/v1"
    return f"{u.scheme}://{u.netloc}{path}"


def _call(url: str, payload: dict | None = None, timeout: float = PROBE_TIMEOUT_S) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def _http_error(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read().decode())
        msg = body.get("message") or (body.get("error") or {}).get("message") or json.dumps(body)
    except Exception:
        msg = exc.reason
    return f"HTTP {exc.code}: {str(msg).splitlines()[0][:200]}"


def check_server(base_url: str | None, model: str | None, *, need_logprobs: bool) -> dict:
    """{"base_url", "model", "max_model_len"} of a server that answers, serves `model` and (when needed) returns
    prompt-token log-probabilities; BenchError naming the field and the fix otherwise."""
    root = api_root(base_url)
    try:
        listing = _call(f"{root}/models")
    except urllib.error.HTTPError as exc:
        raise BenchError(f"base-url: {root}/models answered {_http_error(exc)}; is {root} an OpenAI-compatible "
                         "server?") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise BenchError(f"base-url: nothing answers at {root} ({reason}); start a server with `bench serve` or "
                         "fix --base-url") from None
    except json.JSONDecodeError:
        raise BenchError(f"base-url: {root}/models did not return JSON; is {root} an OpenAI-compatible server?") from None
    entries = {m.get("id"): m for m in listing.get("data") or [] if isinstance(m, dict)}
    if not entries:
        raise BenchError(f"base-url: the server at {root} lists no models")
    if model is None:
        if len(entries) > 1:
            raise BenchError(f"served-model: the server at {root} serves {', '.join(sorted(entries))}; pass "
                             "--served-model with one of them")
        model = next(iter(entries))
    if model not in entries:
        raise BenchError(f"served-model: {model!r} is not served at {root}; it serves {', '.join(sorted(entries))}; "
                         "pass one of them (bench serve names them)")
    if need_logprobs:
        probe = {"model": model, "prompt": "The capital of France is", "max_tokens": 1, "temperature": 0,
                 "logprobs": 1, "echo": True}
        try:
            out = _call(f"{root}/completions", probe, timeout=60)
        except urllib.error.HTTPError as exc:
            raise BenchError(f"base-url: the server at {root} refused prompt log-probabilities ({_http_error(exc)}); "
                             "log-likelihood tasks need echo + logprobs: serve with `bench serve` (vLLM), or score "
                             "generation tasks only (gsm8k)") from None
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
            raise BenchError(f"base-url: the completions probe at {root} failed ({exc}); is it an OpenAI-compatible "
                             "server?") from None
        lp = ((out.get("choices") or [{}])[0] or {}).get("logprobs") or {}
        tokens = lp.get("token_logprobs") or []
        if len(tokens) < 2 or not lp.get("top_logprobs"):
            raise BenchError(f"base-url: the server at {root} returns no prompt-token log-probabilities (echo + "
                             "logprobs); log-likelihood tasks need them: serve with `bench serve` (vLLM), or score "
                             "generation tasks only (gsm8k)")
    return {"base_url": root, "model": model, "max_model_len": entries[model].get("max_model_len")}


def make_openai_lm(plan: dict):
    """lm-eval's LocalCompletionsAPI on the checked server. The server's own tokenizer (/tokenize) when it offers
    one (bench serve does), else the tokenizer folder given as plan["tokenizer"]."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.utils import check_remote_tokenizer_support

    root = plan["base_url"]
    server_root = root[: -len("/v1")]
    remote = check_remote_tokenizer_support(server_root)
    if not remote and not plan.get("tokenizer"):
        raise BenchError(f"tokenizer: the server at {root} has no /tokenize + /tokenizer_info endpoints; pass "
                         "--tokenizer <the model's HF folder or hub id>")
    return LocalCompletionsAPI(
        model=plan["model_path"], base_url=f"{root}/completions",
        tokenizer_backend="remote" if remote else "huggingface", tokenizer=None if remote else plan["tokenizer"],
        batch_size=BATCH, num_concurrent=CONCURRENT, max_retries=3, timeout=REQUEST_TIMEOUT_S,
        max_length=plan.get("max_length") or 2048, tokenized_requests=True, seed=plan.get("seed", 0))
