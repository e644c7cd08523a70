// Greedy decoding with llama.cpp itself (node-llama-cpp's prebuilt linux-x64 libllama, CPU only): the check that a
// GGUF written by `reprolora export-gguf` loads and answers in the tool its users run.
//
// node greedy.mjs MODEL.gguf < {"prompt": "<text, chat template already applied>", "max_tokens": N, "logits": bool}
// prints {"llama_cpp", "prompt_ids", "token_ids", "text", "finish_reason", "logits"?}: llama.cpp's own tokenization
// of the prompt (special tokens parsed, nothing added), the generated ids (the end-of-generation token excluded),
// and with "logits" every step's raw logits indexed by token id. Never builds or downloads anything.
import { readFileSync } from "node:fs";
import { getLlama, LlamaLogLevel } from "node-llama-cpp";

const modelPath = process.argv[2];
const request = JSON.parse(readFileSync(0, "utf8"));

const llama = await getLlama({ gpu: false, build: "never", skipDownload: true, usePrebuiltBinaries: true,
                               progressLogs: false, logLevel: LlamaLogLevel.error, maxThreads: 2 });
const model = await llama.loadModel({ modelPath, gpuLayers: 0 });
// The key/value cache in float32 (llama.cpp's default is f16): for an f32 model, llama.cpp's own float32 arithmetic.
const kvType = request.kv_cache ?? "F32";
const context = await model.createContext({ contextSize: 1024, sequences: 1, threads: 2, flashAttention: false,
                                            experimentalKvCacheKeyType: kvType, experimentalKvCacheValueType: kvType });
const sequence = context.getSequence();

const promptIds = model.tokenize(request.prompt, true);
// temperature 0 is llama.cpp's greedy sampler alone: argmax over the raw logits, which it returns untouched.
const next = { token: true, logits: Boolean(request.logits), options: { temperature: 0 } };
const tokenIds = [];
const logits = [];
let finishReason = "length";
let input = [...promptIds.slice(0, -1), [promptIds.at(-1), { generateNext: next }]];
for (let step = 0; step < request.max_tokens; step++) {
  const results = await sequence.controlledEvaluate(input);
  const result = results.at(-1).next;
  if (request.logits) {
    const row = new Array(result.logits.size).fill(null);  // greedy leaves every token in: the whole vocabulary
    for (const [token, value] of result.logits) row[token] = value;
    logits.push(row);
  }
  if (model.isEogToken(result.token)) {
    finishReason = "stop";
    break;
  }
  tokenIds.push(result.token);
  input = [[result.token, { generateNext: next }]];
}

const output = {
  llama_cpp: `${llama.llamaCppRelease.repo} ${llama.llamaCppRelease.release}, ${llama.buildType} binary, gpu ${llama.gpu}`,
  prompt_ids: promptIds,
  token_ids: tokenIds,
  text: model.detokenize(tokenIds, false),
  finish_reason: finishReason,
};
if (request.logits) output.logits = logits;
process.stdout.write(JSON.stringify(output) + "\n");
await context.dispose();
await model.dispose();
await llama.dispose();
