// The official openai Node SDK against Tollgate, as a user would call it.
// Run by proxy/tests/gateway.rs with TOLLGATE_BASE_URL, TOLLGATE_KEY and
// TOLLGATE_MODEL set, and TOLLGATE_DIRECT_URL (the gpu-sim behind it, for
// comparing answers); exits non-zero on the first mismatch.

import assert from "node:assert/strict";
import fs from "node:fs";
import OpenAI from "openai";

const baseURL = `${process.env.TOLLGATE_BASE_URL}/v1`;
const model = process.env.TOLLGATE_MODEL;
const client = new OpenAI({ baseURL, apiKey: process.env.TOLLGATE_KEY, maxRetries: 0 });

const ids = [];
for await (const m of client.models.list()) ids.push(m.id);
assert.ok(ids.includes(model), ids.join(","));

const chat = await client.chat.completions.create({
  model,
  messages: [{ role: "user", content: "Hello" }],
  max_tokens: 5,
});
assert.ok(chat.choices[0].message.content);
assert.equal(chat.usage.completion_tokens, 5);

const pieces = [];
let usage = null;
const stream = await client.chat.completions.create({
  model,
  messages: [{ role: "user", content: "Hello" }],
  max_tokens: 6,
  stream: true,
  stream_options: { include_usage: true },
});
for await (const chunk of stream) {
  const content = chunk.choices[0]?.delta?.content;
  if (content) pieces.push(content);
  if (chunk.usage) usage = chunk.usage;
}
assert.equal(pieces.length, 6);
assert.equal(usage?.completion_tokens, 6);

const embeddings = await client.embeddings.create({ model, input: ["first", "second"] });
assert.equal(embeddings.data.length, 2);
assert.ok(embeddings.data[0].embedding.length > 0);

const direct = new OpenAI({
  baseURL: `${process.env.TOLLGATE_DIRECT_URL}/v1`,
  apiKey: "unused",
  maxRetries: 0,
});
const images = await Promise.all(
  [client, direct].map((c) =>
    c.images.generate({ model, prompt: "a lighthouse", n: 2, size: "256x256", response_format: "b64_json" }),
  ),
);
assert.equal(images[0].data.length, 2);
assert.deepEqual(
  images[0].data.map((i) => i.b64_json),
  images[1].data.map((i) => i.b64_json),
);

const response = await client.responses.create({ model, input: "Hello", max_output_tokens: 5 });
assert.ok(response.output_text);
assert.equal(response.usage.output_tokens, 5);
const responseEvents = [];
for await (const event of await client.responses.create({
  model,
  input: "Hello",
  max_output_tokens: 4,
  stream: true,
})) {
  responseEvents.push(event);
}
const completed = responseEvents.at(-1);
assert.equal(completed.type, "response.completed");
const deltas = responseEvents.filter((e) => e.type === "response.output_text.delta").map((e) => e.delta);
assert.equal(deltas.length, 4);
assert.equal(deltas.join(""), completed.response.output_text ?? completed.response.output[0].content[0].text);

const picture = new URL("../fixtures/image.png", import.meta.url);
const edits = await Promise.all(
  [client, direct].map((c) =>
    c.images.edit({
      image: fs.createReadStream(picture),
      prompt: "add a boat",
      model,
      n: 2,
      size: "64x64",
      response_format: "b64_json",
    }),
  ),
);
assert.equal(edits[0].data.length, 2);
assert.deepEqual(edits[0].data, edits[1].data);

const speech = await Promise.all(
  [client, direct].map(async (c) => {
    const response = await c.audio.speech.create({
      model,
      voice: "alloy",
      input: "Hello there",
      response_format: "wav",
    });
    assert.equal(response.headers.get("content-type"), "audio/wav");
    return Buffer.from(await response.arrayBuffer());
  }),
);
assert.equal(speech[0].subarray(0, 4).toString(), "RIFF");
assert.ok(speech[0].equals(speech[1]));

// The file before the model, as users write it: Tollgate holds the form
// until the model arrives.
const audio = new URL("../fixtures/audio/tone.mp3", import.meta.url);
for (const [create, task] of [
  [(c, body) => c.audio.transcriptions.create(body), "transcribe"],
  [(c, body) => c.audio.translations.create(body), "translate"],
]) {
  const [through, straight] = await Promise.all(
    [client, direct].map((c) =>
      create(c, { file: fs.createReadStream(audio), model, response_format: "verbose_json" }),
    ),
  );
  assert.deepEqual(through, straight);
  assert.equal(through.task, task);
  assert.equal(through.duration, 5.4);
}

await assert.rejects(
  new OpenAI({ baseURL, apiKey: "tg_wrong", maxRetries: 0 }).models.list(),
  (e) => e.status === 401 && e.code === "invalid_api_key",
);
await assert.rejects(
  client.chat.completions.create({ model: "no-such-model", messages: [{ role: "user", content: "x" }] }),
  (e) => e.status === 404 && e.code === "model_not_found",
);

console.log("node sdk ok");
