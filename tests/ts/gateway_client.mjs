// The official TypeScript SDK (@anthropic-ai/sdk) against the ridethrough gateway, only
// baseURL changed: N calls, every other one streamed, each with its own Idempotency-Key so
// the SDK's own retries (it retries a 529 that says x-should-retry: true, after
// retry-after) pick up the same job. Prints one JSON line per call.
//
//   node gateway_client.mjs <baseURL> <apiKey> <model> <calls> <keyPrefix>
import Anthropic from "@anthropic-ai/sdk";

const [baseURL, apiKey, model, calls, prefix] = process.argv.slice(2);
const client = new Anthropic({ baseURL, apiKey, maxRetries: 60, timeout: 120_000 });

async function call(i) {
  const key = `${prefix}-${i}`;
  const body = {
    model,
    max_tokens: 16,
    messages: [{ role: "user", content: `ts call ${i}` }],
  };
  const headers = { "Idempotency-Key": key, "x-ridethrough-wait-s": "2" };
  if (i % 2 === 1) {
    const stream = client.messages.stream(body, { headers });
    let streamed = "";
    stream.on("text", (text) => { streamed += text; });
    const message = await stream.finalMessage();
    return { key, streamed: true, id: message.id, text: message.content[0].text, streamedText: streamed };
  }
  const { data, response } = await client.messages.create(body, { headers }).withResponse();
  return {
    key,
    streamed: false,
    id: data.id,
    text: data.content[0].text,
    job: response.headers.get("x-ridethrough-job-id"),
  };
}

const results = await Promise.all(Array.from({ length: Number(calls) }, (_, i) => call(i)));
for (const r of results) console.log(JSON.stringify(r));
