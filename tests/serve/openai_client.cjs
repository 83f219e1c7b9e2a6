// Drives `lockstep serve` with the official `openai` npm package (installed by
// scripts/install_openai_client.sh) and prints what it got as one JSON object; the C++ test
// (test_openai_client.cpp) checks it against the server's own answers.
//   node openai_client.cjs BASE_URL MODEL NPM_DIR
const path = require('path');
const [baseURL, model, npmDir] = process.argv.slice(2);
const mod = require(path.join(npmDir, 'node_modules', 'openai'));
const OpenAI = mod.OpenAI || mod.default || mod;

async function main() {
  const client = new OpenAI({ baseURL, apiKey: 'unused', maxRetries: 0, timeout: 30000 });
  const out = { version: require(path.join(npmDir, 'node_modules', 'openai', 'package.json')).version };
  out.models = (await client.models.list()).data.map((m) => m.id);
  out.completion = await client.completions.create({
    model, prompt: 'Once upon a time', max_tokens: 8, seed: 7, n: 2, logprobs: 0, ignore_eos: true,
  });
  out.completion_ids = await client.completions.create({ model, prompt: [1, 2, 3], max_tokens: 5, seed: 3 });
  const chat = {
    model, messages: [{ role: 'user', content: 'Hi there' }], max_tokens: 8, seed: 9, logprobs: true,
    chat_template_kwargs: { enable_thinking: false }, ignore_eos: true,
  };
  out.chat = await client.chat.completions.create(chat);
  const streamed = { text: '', output_ids: [], output_logprobs: [], finish_reason: null, chunks: 0, usage: null };
  const stream = await client.chat.completions.create({ ...chat, stream: true, stream_options: { include_usage: true } });
  for await (const chunk of stream) {
    streamed.chunks += 1;
    if (chunk.usage) streamed.usage = chunk.usage;
    for (const c of chunk.choices) {
      streamed.text += c.delta.content ?? '';
      streamed.output_ids.push(...(c.output_ids ?? []));
      streamed.output_logprobs.push(...(c.output_logprobs ?? []));
      if (c.finish_reason) streamed.finish_reason = c.finish_reason;
    }
  }
  out.chat_stream = streamed;
  // Top log-probs: greedy chat (whole and streamed) and completions' `logprobs: N`.
  const top = { ...chat, temperature: 0, top_logprobs: 3 };
  out.chat_top = await client.chat.completions.create(top);
  out.chat_top_stream = [];
  for await (const chunk of await client.chat.completions.create({ ...top, stream: true })) {
    for (const c of chunk.choices) out.chat_top_stream.push(...(c.logprobs?.content ?? []));
  }
  out.completion_top = await client.completions.create({
    model, prompt: 'Once upon a time', max_tokens: 4, temperature: 0, logprobs: 2, ignore_eos: true,
  });
  try {
    await client.completions.create({ model, prompt: 'x', max_tokens: 0 });
    out.error = null;
  } catch (e) {
    out.error = { status: e.status, param: e.param ?? null, type: e.type ?? null, message: e.message };
  }
  console.log(JSON.stringify(out));
}

main().catch((e) => {
  console.error(`openai_client: ${e.stack || e}`);
  process.exit(1);
});
