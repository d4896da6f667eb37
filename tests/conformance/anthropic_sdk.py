"""The `anthropic` Python SDK against the gateway, driven by tests/conformance.rs.

Reads {"keyed": URL, "anonymous": URL, "key": KEY, "cases": [...]} on stdin; each case is
{"id", "client", "call", "model", "prompt", "usage"}; prints one JSON result per case, as a list.

clients: `api_key` and `auth_token` (Anthropic), `bedrock_sigv4` (AnthropicBedrock signing with
dummy AWS keys, on the anonymous listener), `bedrock_key` (AnthropicBedrock with the gateway key
as its Bedrock API key), `vertex` (AnthropicVertex with a dummy Google token; the gateway key in
the `x-tollgate-key` header, the gateway's `server.key_header`).
calls: `create`, `stream`, `count`, `throttled` (the provider answers 429).
"""

import json
import sys

import anthropic
from anthropic import Anthropic, AnthropicBedrock, AnthropicVertex

BETAS = ["interleaved-thinking-2025-05-14", "context-1m-2025-08-07"]
GOOGLE_TOKEN = "ya29.conformance-google-token"
AWS_ACCESS_KEY = "AKIACONFORMANCEDUMMY"
AWS_SECRET_KEY = "conformance-dummy-aws-secret"


def make_client(job, case):
    headers = {"x-conformance-cell": case["id"], "x-mock-usage": json.dumps(case["usage"])}
    if case["call"] == "throttled":
        headers["x-mock-status"] = "429"
    common = {"max_retries": 0, "timeout": 30, "default_headers": headers}
    kind = case["client"]
    if kind == "api_key":
        return Anthropic(base_url=job["keyed"], api_key=job["key"], **common)
    if kind == "auth_token":
        return Anthropic(base_url=job["keyed"], auth_token=job["key"], api_key=None, **common)
    if kind == "bedrock_sigv4":
        return AnthropicBedrock(
            base_url=job["anonymous"],
            aws_access_key=AWS_ACCESS_KEY,
            aws_secret_key=AWS_SECRET_KEY,
            aws_region="us-east-1",
            **common,
        )
    if kind == "bedrock_key":
        return AnthropicBedrock(base_url=job["keyed"], api_key=job["key"], aws_region="us-east-1", **common)
    if kind == "vertex":
        headers["x-tollgate-key"] = job["key"]
        return AnthropicVertex(
            base_url=job["keyed"] + "/v1",
            region="us-east5",
            project_id="p1",
            access_token=GOOGLE_TOKEN,
            **common,
        )
    raise ValueError(f"unknown client {kind}")


def usage_of(u):
    return {
        "input_tokens": u.input_tokens,
        "output_tokens": u.output_tokens,
        "cache_read_input_tokens": u.cache_read_input_tokens or 0,
        "cache_creation_input_tokens": u.cache_creation_input_tokens or 0,
    }


def run(job, case):
    client = make_client(job, case)
    messages = [{"role": "user", "content": case["prompt"]}]
    call = case["call"]
    if call in ("create", "throttled"):
        m = client.beta.messages.create(model=case["model"], max_tokens=64, messages=messages, betas=BETAS)
        return {"text": "".join(b.text for b in m.content if b.type == "text"), "usage": usage_of(m.usage)}
    if call == "stream":
        with client.beta.messages.stream(model=case["model"], max_tokens=64, messages=messages, betas=BETAS) as s:
            text = "".join(s.text_stream)
            final = s.get_final_message()
        return {"text": text, "usage": usage_of(final.usage)}
    if call == "count":
        c = client.beta.messages.count_tokens(model=case["model"], messages=messages, betas=BETAS)
        return {"input_tokens": c.input_tokens}
    raise ValueError(f"unknown call {call}")


def main():
    job = json.load(sys.stdin)
    results = []
    for case in job["cases"]:
        result = {"id": case["id"]}
        try:
            result.update(run(job, case))
        except anthropic.APIStatusError as e:
            result["error"] = {"type": type(e).__name__, "status": e.status_code, "message": str(e)}
        except Exception as e:  # noqa: BLE001 - reported to the Rust side, which decides
            result["error"] = {"type": type(e).__name__, "message": str(e)}
        results.append(result)
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
