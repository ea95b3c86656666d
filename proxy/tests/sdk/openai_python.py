"""The official openai Python SDK against Tollgate, as a user would call it.

Run by proxy/tests/gateway.rs with TOLLGATE_BASE_URL, TOLLGATE_KEY and
TOLLGATE_MODEL set, and TOLLGATE_DIRECT_URL (the gpu-sim behind it, for
comparing answers); exits non-zero on the first mismatch.
"""

import os

import openai
from openai import OpenAI

base_url = os.environ["TOLLGATE_BASE_URL"] + "/v1"
model = os.environ["TOLLGATE_MODEL"]
client = OpenAI(base_url=base_url, api_key=os.environ["TOLLGATE_KEY"], max_retries=0)

ids = [m.id for m in client.models.list()]
assert model in ids, ids

chat = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=5
)
assert chat.choices[0].message.content, chat
assert chat.usage.completion_tokens == 5, chat.usage

raw = client.chat.completions.with_raw_response.create(
    model=model,
    messages=[{"role": "user", "content": "Hello"}],
    max_tokens=2,
    extra_headers={"x-request-id": "sdk-python-1"},
)
assert raw.headers["x-request-id"] == "sdk-python-1", raw.headers

pieces, usage = [], None
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Hello"}],
    max_tokens=6,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
    if chunk.usage:
        usage = chunk.usage
assert len(pieces) == 6, pieces
assert usage is not None and usage.completion_tokens == 6, usage

completion = client.completions.create(model=model, prompt="Once upon", max_tokens=3)
assert completion.usage.completion_tokens == 3, completion

response = client.responses.create(model=model, input="Hello", max_output_tokens=5)
assert response.output_text and response.usage.output_tokens == 5, response
events = list(client.responses.create(model=model, input="Hello", max_output_tokens=4, stream=True))
assert events[-1].type == "response.completed", events[-1]
deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
assert len(deltas) == 4 and "".join(deltas) == events[-1].response.output_text, events

embeddings = client.embeddings.create(model=model, input=["first", "second"])
assert len(embeddings.data) == 2 and len(embeddings.data[0].embedding) > 0, embeddings

direct = OpenAI(
    base_url=os.environ["TOLLGATE_DIRECT_URL"] + "/v1", api_key="unused", max_retries=0
)
images = [
    c.images.generate(
        model=model, prompt="a lighthouse", n=2, size="256x256", response_format="b64_json"
    )
    for c in (client, direct)
]
assert len(images[0].data) == 2, images[0]
assert [i.b64_json for i in images[0].data] == [i.b64_json for i in images[1].data]
picture = os.path.join(os.path.dirname(__file__), "..", "fixtures", "image.png")
edits = []
for c in (client, direct):
    with open(picture, "rb") as image:
        edits.append(
            c.images.edit(
                model=model, image=image, prompt="add a boat", n=2, size="64x64",
                response_format="b64_json",
            )
        )
assert len(edits[0].data) == 2 and edits[0].data == edits[1].data, edits[0]
url = client.images.generate(model=model, prompt="a lighthouse", size="256x256")
assert url.data[0].url.endswith(".png"), url

speech = [
    c.audio.speech.create(model=model, voice="alloy", input="Hello there", response_format="wav")
    for c in (client, direct)
]
assert speech[0].response.headers["content-type"] == "audio/wav"
assert speech[0].content[:4] == b"RIFF" and speech[0].content == speech[1].content

audio = os.path.join(os.path.dirname(__file__), "..", "fixtures", "audio", "tone.wav")
for name in ("transcriptions", "translations"):
    answers = []
    for c in (client, direct):
        with open(audio, "rb") as file:
            answers.append(getattr(c.audio, name).create(model=model, file=file))
    assert answers[0] == answers[1], answers
    assert answers[0].model_dump()["usage"]["seconds"] == 4, answers[0]

try:
    OpenAI(base_url=base_url, api_key="tg_wrong", max_retries=0).models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401 and e.code == "invalid_api_key", e

try:
    client.chat.completions.create(
        model="no-such-model", messages=[{"role": "user", "content": "x"}]
    )
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.code == "model_not_found", e

print("python sdk ok")
