// `lockstep tokenize`: JSONL in, JSONL out, one object per input line, in order.
//   {"text": "..."}                          -> {"input_ids": [...]}
//   {"messages": [...], "tools"?: [...],
//    "add_generation_prompt"?: true, "enable_thinking"?: true}
//                                            -> {"text": "<rendered>", "input_ids": [...]}
//   with --decode: {"input_ids": [...]}      -> {"text": "..."}
// Blank lines are skipped. The first bad line stops the run with an error naming it.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "command_registry.h"
#include "core/error.h"
#include "core/json_parse.h"
#include "core/jsonl.h"
#include "core/output_path.h"
#include "tokenizer/chat_json.h"
#include "tokenizer/tokenizer.h"

namespace lockstep::cli {
namespace {

using nlohmann::ordered_json;

struct TokenizeOptions {
  std::string model_dir;
  std::string input;   // empty: stdin
  std::string output;  // empty: stdout
  bool decode = false;
  bool skip_special = false;
};

bool flag(const ordered_json& request, const char* key, bool fallback, const std::string& where) {
  auto it = request.find(key);
  if (it == request.end() || it->is_null()) return fallback;
  LS_CHECK(it->is_boolean(), where, key, ": expected true or false, found ", it->dump());
  return it->get<bool>();
}

ordered_json handle_encode(const Tokenizer& tok, const ordered_json& request, const std::string& where) {
  const bool has_text = request.contains("text"), has_messages = request.contains("messages");
  LS_CHECK(has_text != has_messages, where, "expected exactly one of the fields \"text\" or \"messages\"");
  ordered_json out = ordered_json::object();
  if (has_text) {
    const ordered_json& text = request["text"];
    LS_CHECK(text.is_string(), where, "text: expected a string, found ", text.dump());
    try {
      out["input_ids"] = tok.encode(text.get_ref<const std::string&>());
    } catch (const Error& e) {
      fail(where, "text: ", e.what());
    }
    return out;
  }
  ChatOptions options;
  options.add_generation_prompt = flag(request, "add_generation_prompt", true, where);
  options.enable_thinking = flag(request, "enable_thinking", true, where);
  if (request.contains("tools")) options.tools = chat_tools_from_json(request["tools"], where);
  const std::string text = tok.render_chat(chat_messages_from_json(request["messages"], where), options);
  out["text"] = text;
  out["input_ids"] = tok.encode(text);
  return out;
}

ordered_json handle_decode(const Tokenizer& tok, const ordered_json& request, const std::string& where,
                           bool skip_special) {
  auto it = request.find("input_ids");
  LS_CHECK(it != request.end(), where, "input_ids: missing (--decode expects {\"input_ids\": [...]})");
  LS_CHECK(it->is_array(), where, "input_ids: expected an array of token ids, found ", it->dump());
  std::vector<int32_t> ids;
  ids.reserve(it->size());
  for (size_t i = 0; i < it->size(); ++i) {
    const ordered_json& id = (*it)[i];
    LS_CHECK(id.is_number_integer() && id.get<int64_t>() >= 0 && id.get<int64_t>() < tok.vocab_size(), where,
             "input_ids[", i, "]: expected a token id in [0, ", tok.vocab_size(), "), found ", id.dump());
    ids.push_back(static_cast<int32_t>(id.get<int64_t>()));
  }
  ordered_json out = ordered_json::object();
  try {
    out["text"] = tok.decode(ids, skip_special);
  } catch (const Error& e) {
    fail(where, "input_ids: ", e.what());
  }
  return out;
}

int run_tokenize(const TokenizeOptions& o) {
  check_output_differs(o.output, {o.input}, "--output");
  const Tokenizer tok = Tokenizer::load(o.model_dir);
  std::ifstream in_file;
  if (!o.input.empty()) {
    in_file.open(o.input, std::ios::binary);
    LS_CHECK(in_file.is_open(), o.input, ": cannot open for reading");
  }
  std::istream& in = o.input.empty() ? std::cin : in_file;
  JsonlWriter out(o.output.empty() ? "-" : o.output);
  const std::string source = o.input.empty() ? "<stdin>" : o.input;

  std::string line;
  for (size_t line_no = 1; std::getline(in, line); ++line_no) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = source + ":" + std::to_string(line_no) + ": ";
    const ordered_json request = parse_ordered_json(line, where.substr(0, where.size() - 2));
    LS_CHECK(request.is_object(), where, "expected a JSON object, found ", request.dump());
    const ordered_json result =
        o.decode ? handle_decode(tok, request, where, o.skip_special) : handle_encode(tok, request, where);
    out.write_line(result.dump(-1, ' ', false, ordered_json::error_handler_t::replace));
  }
  out.close();
  return 0;
}

const bool registered = register_command(
    {"tokenize", "Encode text or chat messages to token ids (or decode ids) as JSONL", [](CLI::App& sub) {
       auto o = std::make_shared<TokenizeOptions>();
       sub.add_option("--model", o->model_dir, "Model directory with tokenizer.json (+ tokenizer_config.json)")
           ->required();
       sub.add_option("--input", o->input, "JSONL input file (default: stdin)");
       sub.add_option("--output", o->output, "JSONL output file (default: stdout)");
       sub.add_flag("--decode", o->decode, "Decode {\"input_ids\": [...]} lines to {\"text\": ...}");
       sub.add_flag("--skip-special", o->skip_special, "With --decode, drop special tokens such as <|im_end|>");
       return std::function<int()>([o] { return run_tokenize(*o); });
     }});

}  // namespace
}  // namespace lockstep::cli
