"""boto3's `bedrock-runtime` client against the gateway, driven by tests/conformance.rs.

Reads {"keyed": URL, "anonymous": URL, "key": KEY, "cases": [...]} on stdin; each case is
{"id", "client", "call", "model", "prompt", "usage"}; prints one JSON result per case, as a list.

clients: `bearer` (the gateway key as the Bedrock API key, AWS_BEARER_TOKEN_BEDROCK, on the HTTPS
listener: boto3 sends a bearer token over HTTPS only), `sigv4` (dummy AWS keys, SigV4-signed, on
the anonymous listener).
Each result also says what boto3 sent (`sent`: url, headers, body, as it left) and the gateway's
`x-tollgate-request-id` it was answered with (`request_id`).
calls: `invoke` (InvokeModel), `stream` (InvokeModelWithResponseStream), `count` (CountTokens),
`throttled` (the provider answers 429).
"""

import json
import os
import sys

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

BETAS = ["interleaved-thinking-2025-05-14", "context-1m-2025-08-07"]
AWS_ACCESS_KEY = "AKIACONFORMANCEDUMMY"
AWS_SECRET_KEY = "conformance-dummy-aws-secret"


def make_client(job, case, seen):
    config = Config(retries={"mode": "standard", "total_max_attempts": 1}, read_timeout=30, connect_timeout=5)
    if case["client"] == "bearer":
        # boto3 reads the Bedrock API key from AWS_BEARER_TOKEN_BEDROCK as it sends (set by main).
        session = boto3.Session(region_name="us-east-1")
        client = session.client("bedrock-runtime", endpoint_url=job["tls"], verify=job["ca_file"], config=config)
    elif case["client"] == "sigv4":
        session = boto3.Session(
            aws_access_key_id=AWS_ACCESS_KEY, aws_secret_access_key=AWS_SECRET_KEY, region_name="us-east-1"
        )
        client = session.client("bedrock-runtime", endpoint_url=job["anonymous"], config=config)
    else:
        raise ValueError(f"unknown client {case['client']}")

    extra = {"x-conformance-cell": case["id"], "x-mock-usage": json.dumps(case["usage"])}
    if case["call"] == "throttled":
        extra["x-mock-status"] = "429"

    def add_headers(request, **_):
        for name, value in extra.items():
            request.headers[name] = value

    def keep_sent(request, **_):
        body = request.body
        if isinstance(body, bytes):
            body = body.decode("utf-8", "replace")
        text = lambda v: v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)  # noqa: E731
        headers = {text(k): text(v) for k, v in request.headers.items()}
        seen["sent"] = {"url": request.url, "headers": headers, "body": body or ""}

    def keep_request_id(http_response, parsed, **_):
        rid = (parsed or {}).get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-tollgate-request-id")
        if rid:
            seen["request_id"] = rid

    client.meta.events.register("before-sign.bedrock-runtime.*", add_headers)
    client.meta.events.register("before-send.bedrock-runtime.*", keep_sent)
    client.meta.events.register("after-call.bedrock-runtime.*", keep_request_id)
    return client


def usage_of(u):
    return {
        "input_tokens": u.get("input_tokens", 0),
        "output_tokens": u.get("output_tokens", 0),
        "cache_read_input_tokens": u.get("cache_read_input_tokens") or 0,
        "cache_creation_input_tokens": u.get("cache_creation_input_tokens") or 0,
    }


def run(job, case, seen):
    client = make_client(job, case, seen)
    body = {
        "anthropic_version": "bedrock-2023-05-31",
        "anthropic_beta": BETAS,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": case["prompt"]}],
    }
    call = case["call"]
    if call in ("invoke", "throttled"):
        r = client.invoke_model(modelId=case["model"], body=json.dumps(body), contentType="application/json")
        m = json.loads(r["body"].read())
        text = "".join(b.get("text", "") for b in m["content"])
        return {"text": text, "usage": usage_of(m["usage"])}
    if call == "stream":
        r = client.invoke_model_with_response_stream(modelId=case["model"], body=json.dumps(body))
        text, usage, events = "", {}, []
        for event in r["body"]:
            if "chunk" not in event:
                raise RuntimeError(f"not a chunk: {event}")
            data = json.loads(event["chunk"]["bytes"])
            events.append(data["type"])
            if data["type"] == "message_start":
                usage.update(data["message"]["usage"])
            elif data["type"] == "content_block_delta" and data["delta"]["type"] == "text_delta":
                text += data["delta"]["text"]
            elif data["type"] == "message_delta":
                usage.update({k: v for k, v in data["usage"].items() if v is not None})
        return {"text": text, "usage": usage_of(usage), "events": events}
    if call == "count":
        r = client.count_tokens(modelId=case["model"], input={"invokeModel": {"body": json.dumps(body)}})
        return {"input_tokens": r["inputTokens"]}
    raise ValueError(f"unknown call {call}")


def main():
    job = json.load(sys.stdin)
    results = []
    for case in job["cases"]:
        result = {"id": case["id"]}
        os.environ.pop("AWS_BEARER_TOKEN_BEDROCK", None)
        if case["client"] == "bearer":
            os.environ["AWS_BEARER_TOKEN_BEDROCK"] = job["key"]
        seen = {}
        try:
            result.update(run(job, case, seen))
        except ClientError as e:
            err = e.response.get("Error", {})
            rid = e.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-tollgate-request-id")
            if rid:
                seen["request_id"] = rid
            result["error"] = {
                "type": "ClientError",
                "code": err.get("Code"),
                "message": err.get("Message"),
                "status": e.response.get("ResponseMetadata", {}).get("HTTPStatusCode"),
            }
        except Exception as e:  # noqa: BLE001 - reported to the Rust side, which decides
            result["error"] = {"type": type(e).__name__, "message": str(e)}
        result.update(seen)
        results.append(result)
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
