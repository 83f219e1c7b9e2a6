// Tokenizer throughput: encode/decode MB/s on a few MB of deterministic mixed text
// (English, code, digits, CJK, emoji, whitespace runs), plus load time.
//
//   bench_tokenizer [--dump-text FILE] [--dump-ids FILE] [benchmark flags]
// --dump-text writes the generated text (for bench/hf_tokenizer_peer.py) and
// --dump-ids the ids this implementation produces for it (a JSON array), then exit.
// Environment: LOCKSTEP_TOKENIZER_DIR (default: tests/fixtures/qwen3-tokenizer, then
// models/qwen3-tokenizer), LOCKSTEP_BENCH_TEXT (a file to encode instead of the
// generated text), LOCKSTEP_BENCH_MB (size of the generated text, default 4).
#include <algorithm>
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace {

// xorshift64*: tiny, deterministic on every platform.
struct Rng {
  uint64_t state = 0x9E3779B97F4A7C15ULL;
  uint64_t next() {
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    return state * 0x2545F4914F6CDD1DULL;
  }
  size_t below(size_t n) { return static_cast<size_t>(next() % n); }
};

std::string generate_text(size_t bytes) {
  static const char* words[] = {"the",     "model",  "gradient", "token",   "policy", "reward", "of",
                                "and",     "a",      "to",       "in",      "is",     "that",   "learning",
                                "Qwen",    "expert", "routing",  "batch",   "It's",   "we'll",  "don't",
                                "sampler", "logits", "entropy",  "rollout", "GPU",    "HTTP",   "JSON"};
  static const char* code[] = {
      "def step(self, batch):\n    loss = self.model(batch).mean()\n    loss.backward()\n    return loss.item()\n",
      "for (size_t i = 0; i < n; ++i) {\n\tacc += a[i] * b[i];\n}\n",
      "{\"id\": 17, \"tags\": [\"x\", \"y\"], \"ok\": true}\n",
      "    if x is None:\n        raise ValueError(f\"bad {x!r}\")\n\n\n",
      "SELECT name, COUNT(*) FROM users WHERE age >= 21 GROUP BY name;\n"};
  static const char* cjk[] = {"中文测试，你好世界！", "强化学习的策略梯度方法。", "日本語のテキストです。",
                              "한국어 문장입니다.", "模型的输出概率分布"};
  static const char* emoji[] = {"😀", "🚀", "👍🏽", "👨‍👩‍👧‍👦", "🇯🇵", "✨", "🤖"};
  static const char* spaces[] = {" ", "  ", "\n", "\n\n", "\t", "        ", "\r\n", "   \n   "};
  Rng rng;
  std::string out;
  out.reserve(bytes + 256);
  while (out.size() < bytes) {
    switch (rng.below(10)) {
      case 0: case 1: case 2: case 3: {  // English sentence
        const size_t n = 5 + rng.below(15);
        for (size_t i = 0; i < n; ++i) {
          if (i) out += ' ';
          out += words[rng.below(std::size(words))];
        }
        out += rng.below(3) ? ". " : ", ";
        break;
      }
      case 4: case 5: out += code[rng.below(std::size(code))]; break;
      case 6: {  // numbers
        out += std::to_string(rng.next() % 1000000007ULL);
        out += rng.below(2) ? " + " : ".";
        out += std::to_string(rng.below(1000));
        out += ' ';
        break;
      }
      case 7: out += cjk[rng.below(std::size(cjk))]; break;
      case 8: out += emoji[rng.below(std::size(emoji))]; out += ' '; break;
      default: out += spaces[rng.below(std::size(spaces))]; break;
    }
  }
  return out;
}

std::string tokenizer_dir() {
  if (const char* dir = std::getenv("LOCKSTEP_TOKENIZER_DIR")) return dir;
  for (const char* dir : {"tests/fixtures/qwen3-tokenizer", "models/qwen3-tokenizer"})
    if (lockstep::Tokenizer::available(dir)) return dir;
  std::fprintf(stderr, "bench_tokenizer: set LOCKSTEP_TOKENIZER_DIR to a folder with tokenizer.json\n");
  std::exit(2);
}

const std::string& bench_text() {
  static const std::string text = [] {
    if (const char* path = std::getenv("LOCKSTEP_BENCH_TEXT")) {
      std::ifstream in(path, std::ios::binary);
      std::stringstream ss;
      ss << in.rdbuf();
      return ss.str();
    }
    const char* mb = std::getenv("LOCKSTEP_BENCH_MB");
    return generate_text(static_cast<size_t>((mb ? std::atof(mb) : 4.0) * 1e6));
  }();
  return text;
}

const lockstep::Tokenizer& tokenizer() {
  static const lockstep::Tokenizer tok = lockstep::Tokenizer::load(tokenizer_dir());
  return tok;
}

void set_rate(benchmark::State& state, size_t bytes) {
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * bytes));
  state.counters["MB/s"] =
      benchmark::Counter(static_cast<double>(state.iterations() * bytes) / 1e6, benchmark::Counter::kIsRate);
}

void BM_Encode(benchmark::State& state) {
  const auto& tok = tokenizer();
  const std::string& text = bench_text();
  tok.encode(text);  // warm the word cache, as in a long-running server
  size_t ids = 0;
  for (auto _ : state) {
    auto out = tok.encode(text);
    ids = out.size();
    benchmark::DoNotOptimize(out.data());
  }
  set_rate(state, text.size());
  state.counters["tokens"] = static_cast<double>(ids);
}
BENCHMARK(BM_Encode)->Unit(benchmark::kMillisecond)->MinTime(2.0);

// The same text as many short documents (cut at the first newline after every 1000 bytes;
// bench/hf_tokenizer_peer.py cuts it the same way), encoded one call each: the shape of a
// real data set, where the per-call cost counts.
const std::vector<std::string>& bench_documents() {
  static const std::vector<std::string> docs = [] {
    std::vector<std::string> out;
    const std::string& text = bench_text();
    size_t start = 0;
    while (start < text.size()) {
      size_t cut = text.find('\n', std::min(text.size(), start + 1000));
      size_t end = cut == std::string::npos ? text.size() : cut + 1;
      out.push_back(text.substr(start, end - start));
      start = end;
    }
    return out;
  }();
  return docs;
}

void BM_EncodeDocuments(benchmark::State& state) {
  const auto& tok = tokenizer();
  const auto& docs = bench_documents();
  for (const auto& d : docs) tok.encode(d);  // warm the word cache
  size_t bytes = 0;
  for (const auto& d : docs) bytes += d.size();
  for (auto _ : state)
    for (const auto& d : docs) {
      auto out = tok.encode(d);
      benchmark::DoNotOptimize(out.data());
    }
  set_rate(state, bytes);
  state.counters["documents"] = static_cast<double>(docs.size());
}
BENCHMARK(BM_EncodeDocuments)->Unit(benchmark::kMillisecond)->MinTime(2.0);

void BM_Decode(benchmark::State& state) {
  const auto& tok = tokenizer();
  const auto ids = tok.encode(bench_text());
  for (auto _ : state) {
    auto text = tok.decode(ids);
    benchmark::DoNotOptimize(text.data());
  }
  set_rate(state, bench_text().size());
}
BENCHMARK(BM_Decode)->Unit(benchmark::kMillisecond);

void BM_Load(benchmark::State& state) {
  const std::string dir = tokenizer_dir();
  for (auto _ : state) benchmark::DoNotOptimize(lockstep::Tokenizer::load(dir).vocab_size());
}
BENCHMARK(BM_Load)->Unit(benchmark::kMillisecond)->Iterations(3);

// Handles --dump-text / --dump-ids; returns true if the program should exit.
bool dump_requested(int& argc, char** argv) {
  bool dumped = false;
  for (int i = 1; i + 1 < argc;) {
    const bool text = std::strcmp(argv[i], "--dump-text") == 0, ids = std::strcmp(argv[i], "--dump-ids") == 0;
    if (!text && !ids) {
      ++i;
      continue;
    }
    std::ofstream out(argv[i + 1], std::ios::binary);
    if (text) {
      out << bench_text();
    } else {
      const auto encoded = tokenizer().encode(bench_text());
      out << '[';
      for (size_t k = 0; k < encoded.size(); ++k) out << (k ? "," : "") << encoded[k];
      out << "]\n";
    }
    if (!out) {
      std::fprintf(stderr, "bench_tokenizer: cannot write %s\n", argv[i + 1]);
      std::exit(1);
    }
    std::fprintf(stderr, "bench_tokenizer: wrote %s\n", argv[i + 1]);
    dumped = true;
    for (int k = i; k + 2 <= argc; ++k) argv[k] = argv[k + 2];
    argc -= 2;
  }
  return dumped;
}

}  // namespace

int main(int argc, char** argv) {
  if (dump_requested(argc, argv)) return 0;
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
