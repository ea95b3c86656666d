"""The official Python SDK's Batch API flow through Tollgate, unchanged:
upload a JSONL file, create a batch, poll it, download its output; a batch
with a bad line fails naming it; a cancelled batch ends cancelled.

Environment: TOLLGATE_BASE_URL, TOLLGATE_KEY, TOLLGATE_MODEL."""

import json
import os
import time

from openai import OpenAI

client = OpenAI(base_url=os.environ["TOLLGATE_BASE_URL"] + "/v1", api_key=os.environ["TOLLGATE_KEY"])
model = os.environ["TOLLGATE_MODEL"]
ENDED = ("completed", "failed", "expired", "cancelled")


def jsonl(requests):
    return "\n".join(json.dumps(r) for r in requests).encode()


def chat_line(i, max_tokens=5):
    return {
        "custom_id": f"req-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": max_tokens},
    }


def wait(batch):
    deadline = time.monotonic() + 30
    while batch.status not in ENDED:
        assert time.monotonic() < deadline, f"batch {batch.id} still {batch.status}"
        time.sleep(0.1)
        batch = client.batches.retrieve(batch.id)
    return batch


# The documented flow.
upload = client.files.create(file=("requests.jsonl", jsonl(chat_line(i) for i in range(5))), purpose="batch")
assert upload.purpose == "batch" and upload.bytes > 0, upload
assert client.files.retrieve(upload.id).id == upload.id
batch = client.batches.create(
    input_file_id=upload.id,
    endpoint="/v1/chat/completions",
    completion_window="24h",
    metadata={"run": "sdk"},
)
assert batch.status == "in_progress" and batch.request_counts.total == 5, batch
batch = wait(batch)
assert batch.status == "completed", batch
assert (batch.request_counts.completed, batch.request_counts.failed) == (5, 0), batch
assert batch.metadata == {"run": "sdk"} and batch.error_file_id is None, batch
output = client.files.content(batch.output_file_id).text
results = [json.loads(line) for line in output.splitlines()]
assert sorted(r["custom_id"] for r in results) == [f"req-{i}" for i in range(5)], output
for result in results:
    assert result["error"] is None, result
    assert result["response"]["status_code"] == 200, result
    assert result["response"]["body"]["usage"]["completion_tokens"] == 5, result
assert batch.id in [b.id for b in client.batches.list(limit=10)]

# A bad line fails the whole batch at once, naming the line.
bad = [chat_line(0), {"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions", "body": {"model": model}}]
upload = client.files.create(file=("bad.jsonl", jsonl(bad)), purpose="batch")
failed = wait(client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"))
assert failed.status == "failed", failed
assert [e.line for e in failed.errors.data] == [2], failed.errors

# A cancelled batch ends cancelled; what ran is in its output.
slow = client.files.create(file=("slow.jsonl", jsonl(chat_line(i, 200) for i in range(20))), purpose="batch")
batch = client.batches.create(input_file_id=slow.id, endpoint="/v1/chat/completions", completion_window="24h")
cancelled = wait(client.batches.cancel(batch.id))
assert cancelled.status == "cancelled", cancelled
assert cancelled.request_counts.completed + cancelled.request_counts.failed == 20, cancelled
assert cancelled.error_file_id is not None, cancelled
errors = [json.loads(line) for line in client.files.content(cancelled.error_file_id).text.splitlines()]
assert any(e["error"] and e["error"]["code"] == "batch_cancelled" for e in errors), errors

client.files.delete(upload.id)
print("batch flow ok")
