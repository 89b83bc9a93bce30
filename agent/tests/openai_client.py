"""The official `openai` Python client against ccnoded's API.

Run by agent/tests/inference.rs with the test virtual environment's python:
    openai_client.py BASE_URL MODEL
Prints one JSON object with what the client saw; the Rust test checks it.
"""

import json
import sys

import openai


def main() -> None:
    base_url, model = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
    out = {}

    out["models"] = [m.id for m in client.models.list().data]

    c = client.completions.create(model=model, prompt="hello", max_tokens=8, temperature=0)
    out["completion"] = {
        "text": c.choices[0].text,
        "finish_reason": c.choices[0].finish_reason,
        "completion_tokens": c.usage.completion_tokens,
        "prompt_tokens": c.usage.prompt_tokens,
        "object": c.object,
    }

    pieces = []
    finish = None
    usage = None
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hi there"}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    out["chat_stream"] = {"text": "".join(pieces), "finish_reason": finish, "chunks": len(pieces),
                          "completion_tokens": usage}

    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi there"}], max_tokens=8, temperature=0
    )
    out["chat"] = {"text": chat.choices[0].message.content, "role": chat.choices[0].message.role}

    try:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
        out["unknown_model"] = "accepted"
    except openai.NotFoundError as e:
        out["unknown_model"] = e.status_code

    print(json.dumps(out))


if __name__ == "__main__":
    main()
